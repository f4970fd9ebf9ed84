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
# Selective reconstruction (lorc.decode_top_k) of a file with the exact window, by its window: the
# first (min_window, k) whose min_window the window reaches; narrower windows and plain latent files
# rebuild every key (0). A wider window lets a smaller k keep quality. Measured against the same file
# with every key rebuilt, decoding one token at a time (README, "Selective reconstruction"): W = 512,
# k = 128: Gemma-3-270M -0.06% / +0.27% (news / drama, ctx 2048), SmolLM2 -0.19% (news, 4K); the
# SmolLM2 default W = 384 with k = 256: +0.32% news but +1.55% drama (k = 128: +2.5%), so it keeps 0
DECODE_TOP_K_BY_WINDOW = ((512, 128),)


def default_decode_top_k(recent_window: int) -> int:
    """The converter's lorc.decode_top_k for a file whose exact window is ``recent_window`` (0: none)."""
    return next((k for w, k in DECODE_TOP_K_BY_WINDOW if recent_window >= w), 0)

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
