"""Every name lorc-gguf writes into or reads from a GGUF, in one place.

This module is the file-format contract shared by the converter (``lorc_gguf``) and the llama.cpp
patch series (``patches/llama.cpp``). Change a name here only together with the patch, and bump
``LORC_FORMAT_VERSION`` when the meaning of a file changes.
"""

from __future__ import annotations

from pathlib import Path

LORC_FORMAT_VERSION = 1

# --- general metadata -------------------------------------------------------------------------
KEY_VERSION = "lorc.version"  # uint32
KEY_ALLOCATION = "lorc.allocation"  # string: "progressive", "uniform", "explicit", ...
KEY_METHOD = "lorc.method"  # string: "svd" (data-free) or an activation-aware method name
KEY_SINK_TOKENS = "lorc.sink_tokens"  # uint32, hybrid cache default (issue 9)
KEY_RECENT_WINDOW = "lorc.recent_window"  # uint32, hybrid cache default (issue 9)
# uint32, selective reconstruction default for decoding (issue 8): a decoded token rebuilds only
# this many latent keys per layer, 0 = every key; optional (older files lack it: 0)
KEY_DECODE_TOP_K = "lorc.decode_top_k"

# per-layer ranks, uint32 arrays of length block_count; value == n_embd_k_gqa / n_embd_v_gqa
# means the layer is not factorized (keeps attn_k / attn_v)
KEY_KEY_RANK = "{arch}.attention.lorc_key_rank"
KEY_VALUE_RANK = "{arch}.attention.lorc_value_rank"

# --- tensors ---------------------------------------------------------------------------------
# ggml shapes: *_down [n_embd, r] (x -> latent), *_up [r, n_embd_{k,v}_gqa] (latent -> k/v)
TENSOR_K_DOWN = "blk.{bid}.attn_k_down.weight"
TENSOR_K_UP = "blk.{bid}.attn_k_up.weight"
TENSOR_V_DOWN = "blk.{bid}.attn_v_down.weight"
TENSOR_V_UP = "blk.{bid}.attn_v_up.weight"
TENSOR_K = "blk.{bid}.attn_k.weight"
TENSOR_V = "blk.{bid}.attn_v.weight"
TENSOR_K_BIAS = "blk.{bid}.attn_k.bias"
TENSOR_V_BIAS = "blk.{bid}.attn_v.bias"

# --- defaults --------------------------------------------------------------------------------
# Ranks are rounded to a multiple of this: q8_0/q4_0 factor and cache rows need blocks of 32.
RANK_MULTIPLE = 32
MIN_RANK = 32

# Exact sinks and recent window of a converted file (lorc.sink_tokens / lorc.recent_window) when
# the converter is not told otherwise: measured on SmolLM2 on held-out domains (README, "Converting"):
# 384 is the narrowest window measured within +3% of the original at ctx 2048 on every held-out text
DEFAULT_SINK_TOKENS = 4
DEFAULT_RECENT_WINDOW = 384
# Selective reconstruction (lorc.decode_top_k) of a file with the exact window and latent keys; the
# runtime attends the latent cells left out at their score's logits (lorc_attend_rest, on by default).
# SmolLM2's defaults (4 + 384 exact) with k = 64, against every key rebuilt on held-out text: drama
# 4K -0.40%, news 4K -0.06%, drama 8K +0.41%; decode 0.78-0.87x the original at 4K and 1.06-1.17x
# at 16K on 2 CPU threads, where every key rebuilt decodes at ~0.26x (README, "Selective
# reconstruction").
# Sliding-window models: Gemma-3-270M's defaults (window 512) with k = 128 decode at 0.94x the original
# at 8K within -0.06% / +0.27% (news / drama, ctx 2048) of every key rebuilt; only its global layers
# (1 in 6) select
DEFAULT_DECODE_TOP_K = 64
DEFAULT_DECODE_TOP_K_SWA = 128

# --- files beside a GGUF -----------------------------------------------------------------------
# the conversion's JSON report (ranks and the kappa profile, which the GGUF does not carry)
REPORT_SUFFIX = ".lorc.json"
F16_BYTES = 2  # the cache element size the bytes/token figures of reports assume


def report_path(gguf_path: Path) -> Path:
    """``OUT.gguf`` -> ``OUT.gguf.lorc.json``"""
    return Path(str(gguf_path) + REPORT_SUFFIX)


def key_rank_key(arch: str) -> str:
    return KEY_KEY_RANK.format(arch=arch)


def value_rank_key(arch: str) -> str:
    return KEY_VALUE_RANK.format(arch=arch)
