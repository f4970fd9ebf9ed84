"""Perplexity, KL divergence and KV bytes per token of GGUF models run by the patched runtime.

What ``tools/eval.py`` computes, llama-perplexity style: the text is tokenized once (no BOS),
cut into chunks of ``ctx`` tokens, and each chunk is evaluated in a fresh cache with its first
token replaced by BOS. Only the second half of a chunk is scored: the NLL of token ``j+1`` given
the logits at ``j`` for ``j`` in ``[ctx/2, ctx-1)``. The first model given is the baseline: every
other model gets the mean KL(baseline || model) and the top-1 agreement over the same scored
positions, and its KV bytes per token (measured from the runtime) as a ratio of the baseline's.

The texts are the evaluation domains of ``corpus``: by default ``news`` and ``drama``, which the
calibration text never contains, and ``docs``, the pydoc half disjoint from the calibration half;
any UTF-8 file works too. Several texts give one report each and a summary.

Also the pieces the other tools share: model specs (``PATH[@CACHE_K[,CACHE_V]]``, ``smollm2``
for the embedded model), decoding with logits only where needed, greedy generation with the
model's chat template (``tools/compare.py``), machine and version info for the JSON files.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import time
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import constants
from .errors import LorcError
from .session import CACHE_TYPES, Session, SessionParams, silence_llama_logs
from . import corpus
from .corpus import calibration_text, eval_text, pydoc_text  # noqa: F401 (re-exported)

# llama.cpp serializes pos, n_seq_id and one seq_id (int32 each) per cell next to the K/V rows:
# a sequence state grows by this much per token on top of the cache itself
CELL_METADATA_BYTES = 12
SMOLLM2_ALIAS = "smollm2"
DEFAULT_CTX = 512
DEFAULT_CHUNKS = 8
KV_PROBE_TOKENS = 128  # tokens used to measure KV bytes per token
QUANTIZED_CACHE_TYPES = tuple(t for t in CACHE_TYPES if t.startswith("q"))
FLASH_ATTN_CHOICES = ("auto", "on", "off")


# --- text ----------------------------------------------------------------------------------------

# the evaluation texts of tools/eval.py by default: the domains calibration never sees, then the
# documentation half that it does (in-domain, for comparison with earlier numbers)
DEFAULT_TEXTS = corpus.HELD_OUT_DOMAINS + ("docs",)


def read_text(spec: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(text, description) of an evaluation domain of ``corpus`` (``news``, ``drama``, ``docs``)
    or of a text file; ``None`` is the docs domain (the pydoc evaluation half)."""
    if spec is None:
        spec = "docs"
    if str(spec) in corpus.DOMAINS:
        d = corpus.domain(str(spec))
        return d.text(corpus.EVALUATION), f"{d.name} ({d.genre}: {d.source})"
    p = Path(spec)
    if not p.is_file():
        raise LorcError(f"text not found: {p} is neither a file nor a domain "
                        f"({', '.join(corpus.EVALUATION_DOMAINS)})")
    return p.read_text(encoding="utf-8", errors="replace"), str(p)


def parse_texts(spec: str | None) -> list[str]:
    """``--text``: comma-separated domains and/or files (default ``DEFAULT_TEXTS``)."""
    if spec is None:
        return list(DEFAULT_TEXTS)
    items = [x.strip() for x in spec.split(",") if x.strip()]
    if not items:
        raise LorcError("--text names no text")
    if len(set(items)) != len(items):
        raise LorcError(f"--text names a text twice: {spec}")
    return items


# --- models ----------------------------------------------------------------------------------------

def resolve_model_path(name: str | os.PathLike[str]) -> Path:
    """A model path; ``smollm2`` names the embedded SmolLM2-135M-Instruct GGUF."""
    if str(name) == SMOLLM2_ALIAS:
        from .models import smollm2_path

        return smollm2_path()
    p = Path(name)
    if not p.is_file():
        raise LorcError(f"model not found: {p}")
    return p


@functools.lru_cache(maxsize=64)
def _gguf_info(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    import gguf

    from .load import FastGGUFReader  # ~10x faster than gguf.GGUFReader on a 49k-token vocabulary

    try:
        reader = FastGGUFReader(path, "r")
    except Exception as e:
        raise LorcError(f"{path} is not a readable GGUF file ({e})") from e
    fields = reader.fields

    def scalar(key: str) -> int | None:
        f = fields.get(key)
        return None if f is None else int(f.parts[-1][0])

    def array(key: str) -> list[int] | None:
        f = fields.get(key)
        return None if f is None else [int(f.parts[i][0]) for i in f.data]

    arch_field = fields.get(gguf.Keys.General.ARCHITECTURE)
    arch = bytes(arch_field.parts[-1]).decode() if arch_field is not None else ""
    n_head = scalar(gguf.Keys.Attention.HEAD_COUNT.format(arch=arch))
    n_head_kv = scalar(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch)) or n_head
    n_embd = scalar(gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch))
    k_len = scalar(gguf.Keys.Attention.KEY_LENGTH.format(arch=arch)) or (
        n_embd // n_head if n_embd and n_head else None)
    v_len = scalar(gguf.Keys.Attention.VALUE_LENGTH.format(arch=arch)) or k_len
    return {"arch": arch,
            "lorc_version": scalar(constants.KEY_VERSION) or 0,
            "n_layer": scalar(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)),
            "n_ctx_train": scalar(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch)),
            "key_rank": array(constants.key_rank_key(arch)),
            "value_rank": array(constants.value_rank_key(arch)),
            "key_width": n_head_kv * k_len if n_head_kv and k_len else None,
            "value_width": n_head_kv * v_len if n_head_kv and v_len else None,
            "sink_tokens": scalar(constants.KEY_SINK_TOKENS) or 0,
            "recent_window": scalar(constants.KEY_RECENT_WINDOW) or 0,
            "decode_top_k": scalar(constants.KEY_DECODE_TOP_K) or 0}


def gguf_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the tools read from a GGUF's metadata (cached per file version): ``arch``,
    ``lorc_version`` (0 for an ordinary model), ``n_ctx_train``, ``key_rank``/``value_rank`` (None
    for an ordinary model) and the dense ``key_width``/``value_width`` (n_head_kv * head_dim)."""
    st = os.stat(path)
    return dict(_gguf_info(str(Path(path).resolve()), st.st_mtime_ns, st.st_size))


def _runtime_default(path: str | os.PathLike[str], key: str, value: int | None) -> int:
    """A runtime setting as the runtime resolves it for a context: ``value`` (the context
    parameter), or the file's ``key`` (a gguf_info field) for None; 0 for an ordinary model."""
    info = gguf_info(path)
    if not info["lorc_version"]:
        return 0
    return info[key] if value is None else int(value)


def hybrid_in_effect(path: str | os.PathLike[str], sink_tokens: int | None = None,
                     recent_window: int | None = None) -> tuple[int, int]:
    """(sink tokens, recent window) of the exact window the runtime gives a file: the settings
    passed, or for None the file's lorc.sink_tokens / lorc.recent_window; (0, 0) for a plain latent
    cache or an ordinary model."""
    return (_runtime_default(path, "sink_tokens", sink_tokens),
            _runtime_default(path, "recent_window", recent_window))


def top_k_in_effect(path: str | os.PathLike[str], top_k: int | None = None) -> int:
    """The selective-reconstruction k the runtime gives a file's decoded tokens: ``top_k``, or for
    None the file's lorc.decode_top_k; 0 (every key) for an ordinary model."""
    return _runtime_default(path, "decode_top_k", top_k)


def lorc_ranks(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``{"arch", "key_rank", "value_rank", "key_width", "value_width"}`` of a LoRC GGUF, None for
    an ordinary model."""
    info = gguf_info(path)
    if not info["lorc_version"] or info["key_rank"] is None:
        return None
    return {k: info[k] for k in ("arch", "key_rank", "value_rank", "key_width", "value_width")}


@dataclass(frozen=True)
class ModelConfig:
    """A model and the cache it runs with. ``flash_attn`` None means auto (on: what llama.cpp's
    auto setting resolves to on CPU, and required by a quantized V cache)."""

    path: Path
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool | None = None
    label: str = ""
    # the LoRC runtime's settings for a LoRC model (None: the file's default, see SessionParams)
    lorc_top_k: int | None = None
    lorc_sink_tokens: int | None = None
    lorc_recent_window: int | None = None

    @property
    def fa(self) -> bool:
        return True if self.flash_attn is None else self.flash_attn

    @property
    def cache(self) -> str:
        k, v = self.cache_type_k, self.cache_type_v
        return k if k == v else f"{k}/{v}"

    def params(self, n_ctx: int, n_batch: int, threads: int, n_seq_max: int = 1) -> SessionParams:
        return SessionParams(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_seq_max=n_seq_max,
                             flash_attn=self.fa, cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v,
                             n_threads=threads, lorc_sink_tokens=self.lorc_sink_tokens,
                             lorc_recent_window=self.lorc_recent_window, lorc_top_k=self.lorc_top_k)

    def describe(self) -> dict[str, Any]:
        sinks, window = hybrid_in_effect(self.path, self.lorc_sink_tokens, self.lorc_recent_window)
        return {"label": self.label, "path": str(self.path), "cache_type_k": self.cache_type_k,
                "cache_type_v": self.cache_type_v, "flash_attn": self.fa,
                "lorc_top_k": top_k_in_effect(self.path, self.lorc_top_k),
                "lorc_sink_tokens": sinks, "lorc_recent_window": window}


def with_top_k(config: ModelConfig, top_k: int) -> ModelConfig:
    """``config`` with selective reconstruction of ``top_k`` keys per decoded token (0 = all),
    labelled so."""
    label = config.label if top_k == 0 else f"{config.label} [top-{top_k}]"
    return replace(config, label=label, lorc_top_k=top_k)


def check_unique_labels(configs: Sequence[ModelConfig]) -> None:
    labels = [c.label for c in configs]
    if len(set(labels)) != len(labels):
        raise LorcError(f"two configurations share a label: {labels}")


def parse_flash_attn(value: str) -> bool | None:
    if value not in FLASH_ATTN_CHOICES:
        raise LorcError(f"--flash-attn must be one of {', '.join(FLASH_ATTN_CHOICES)}, got '{value}'")
    return None if value == "auto" else value == "on"


def check_cache_type(name: str) -> str:
    if name not in CACHE_TYPES:
        raise LorcError(f"unknown cache type '{name}' (choose from {', '.join(CACHE_TYPES)})")
    return name


def make_config(path: str | os.PathLike[str], cache_type_k: str = "f16", cache_type_v: str = "f16",
                flash_attn: bool | None = None, label: str | None = None) -> ModelConfig:
    """A checked ``ModelConfig``: the file exists, cache types are known, and a quantized V cache
    does not meet an explicit ``flash_attn=False`` (llama.cpp refuses that context)."""
    p = resolve_model_path(path)
    k, v = check_cache_type(cache_type_k), check_cache_type(cache_type_v)
    if flash_attn is False and v in QUANTIZED_CACHE_TYPES:
        raise LorcError(f"llama.cpp needs flash attention for a quantized V cache ({v}); "
                        "use --flash-attn on (or auto)")
    if label is None:
        label = p.stem if k == v == "f16" else f"{p.stem} [{k if k == v else k + '/' + v}]"
    return ModelConfig(p, k, v, flash_attn, label)


def parse_model_spec(spec: str, cache_type_k: str = "f16", cache_type_v: str = "f16",
                     flash_attn: bool | None = None, label: str | None = None) -> ModelConfig:
    """``PATH``, ``PATH@CACHE`` (K and V) or ``PATH@CACHE_K,CACHE_V``; ``smollm2`` for the embedded
    model. Without ``@`` the given default cache types apply."""
    path, sep, cache = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if sep:
        parts = cache.split(",")
        if len(parts) not in (1, 2) or not all(parts):
            raise LorcError(f"bad model spec '{spec}': use PATH@CACHE or PATH@CACHE_K,CACHE_V")
        cache_type_k, cache_type_v = parts[0], parts[-1]
    return make_config(path, cache_type_k, cache_type_v, flash_attn, label)


def open_session(config: ModelConfig, n_ctx: int, n_batch: int, threads: int, n_seq_max: int = 1) -> Session:
    """A ``Session`` for ``config``, refusing a LoRC file on an unpatched runtime with a clear message."""
    from . import runtime

    silence_llama_logs()
    if gguf_info(config.path)["lorc_version"] > 0:
        try:
            runtime.require_patched_runtime()
        except runtime.RuntimeNotPatched as e:
            raise LorcError(str(e)) from e
    try:
        return Session(config.path, config.params(n_ctx, n_batch, threads, n_seq_max))
    except RuntimeError as e:
        raise LorcError(f"{config.label}: {e}") from e


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


# --- decoding --------------------------------------------------------------------------------------

def decode_tokens(session: Session, tokens: Sequence[int], pos0: int = 0, outputs_from: int | None = None,
                  seq_id: int = 0) -> np.ndarray:
    """Decode ``tokens`` at positions ``pos0...`` in chunks of n_batch, asking llama.cpp for logits
    only at indices ``>= outputs_from`` (None: only the last token). Returns those logits,
    ``[n_outputs, n_vocab]`` float32."""
    lib, n = session.lib, len(tokens)
    first = n - 1 if outputs_from is None else max(0, outputs_from)
    rows = []
    nb = session.params.n_batch
    for start in range(0, n, nb):
        chunk = tokens[start:start + nb]
        b = session._batch
        b.n_tokens = len(chunk)
        n_out = 0
        for i, tok in enumerate(chunk):
            b.token[i] = tok
            b.pos[i] = pos0 + start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_id
            want = start + i >= first
            b.logits[i] = want
            n_out += want
        rc = lib.llama_decode(session.ctx, b)
        if rc != 0:
            raise LorcError(f"llama_decode returned {rc} (context full or out of memory?)")
        if n_out:
            ptr = lib.llama_get_logits(session.ctx)
            rows.append(np.ctypeslib.as_array(ptr, shape=(n_out, session.n_vocab)).copy())
    return np.concatenate(rows) if rows else np.zeros((0, session.n_vocab), np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over rows of KL(softmax(p) || softmax(q)), in float64."""
    p, q = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def bos_token(session: Session) -> int | None:
    bos = int(session.lib.llama_vocab_bos(session.vocab))
    return bos if bos >= 0 else None


# --- perplexity ------------------------------------------------------------------------------------

def make_chunks(tokens: Sequence[int], ctx: int, n_chunks: int, bos: int | None) -> list[list[int]]:
    """Up to ``n_chunks`` consecutive chunks of ``ctx`` tokens, the first token of each replaced by
    BOS (as llama-perplexity does when the vocabulary adds one)."""
    if ctx < 4:
        raise LorcError(f"--ctx must be at least 4, got {ctx}")
    available = len(tokens) // ctx
    if available < 1:
        raise LorcError(f"the text has {len(tokens)} tokens, fewer than one chunk of --ctx {ctx}")
    chunks = []
    for c in range(min(n_chunks, available)):
        chunk = list(tokens[c * ctx:(c + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        chunks.append(chunk)
    return chunks


@dataclass
class _Scores:
    nll: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    mean = float(values.mean())
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, se


@dataclass(frozen=True)
class KvBytes:
    """KV bytes from the runtime's sequence state. ``raw``/``per_token``: what a sequence grows by
    per token, with and without the per-cell metadata llama.cpp serializes next to the rows. A
    hybrid cache adds ``exact_cells`` (sinks + window) at ``exact_bytes_per_cell`` each (KV-only),
    a fixed amount per sequence rather than per token."""

    raw: float
    per_token: float
    exact_cells: int = 0
    exact_bytes_per_cell: float = 0.0

    @property
    def exact_bytes(self) -> float:
        return self.exact_cells * self.exact_bytes_per_cell

    def sequence_bytes(self, n_tokens: int) -> float:
        """KV-only bytes of one sequence of ``n_tokens`` tokens."""
        return n_tokens * self.per_token + min(self.exact_cells, n_tokens) * self.exact_bytes_per_cell


def _cache_bytes_per_value(cache_type: str) -> float:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(CACHE_TYPES[cache_type])]
    return size / block


def measure_kv_bytes(session: Session, tokens: Sequence[int]) -> KvBytes:
    """Bytes per token from the growth of the runtime's sequence state over a short probe.

    An exact window serializes only the exact cells a query can still see, so while the probe runs
    its exact store grows and then stops at sinks + window: the per-token figure is measured on the
    same file as a plain latent cache (0/0 settings), and the exact cells, full-width K and V of
    every layer in the session's cache types, are reported per sequence."""
    probe = list(tokens[:min(KV_PROBE_TOKENS, session.params.n_ctx)])
    sinks, window = hybrid_in_effect(session.path, session.params.lorc_sink_tokens, session.params.lorc_recent_window)
    if not sinks + window:
        raw = session.kv_bytes_per_token(probe)
        session.clear()
        return KvBytes(raw, raw - CELL_METADATA_BYTES)
    with Session(session.path, replace(session.params, lorc_sink_tokens=0, lorc_recent_window=0)) as plain:
        latent = plain.kv_bytes_per_token(probe)
    info = gguf_info(session.path)
    per_cell = info["n_layer"] * (info["key_width"] * _cache_bytes_per_value(session.params.cache_type_k) +
                                  info["value_width"] * _cache_bytes_per_value(session.params.cache_type_v))
    return KvBytes(latent, latent - CELL_METADATA_BYTES, sinks + window, per_cell)


def decode_chunk(session: Session, chunk: Sequence[int], first: int, decode_tail: int = 0) -> np.ndarray:
    """Logits at positions ``first..len(chunk)-1`` of a chunk decoded from position 0. The last
    ``decode_tail`` tokens are decoded one per llama_decode call, as generation runs them (the
    LoRC runtime's selective reconstruction, lorc_top_k, acts only on such calls)."""
    n = len(chunk)
    split = n - decode_tail if decode_tail > 0 else n
    rows = [decode_tokens(session, chunk[:split], 0, outputs_from=first)]
    for j in range(split, n):
        logits = decode_tokens(session, chunk[j:j + 1], j, outputs_from=0)
        if j >= first:
            rows.append(logits)
    return np.concatenate(rows)


def evaluate(configs: Sequence[ModelConfig], text: str, ctx: int = DEFAULT_CTX, n_chunks: int = DEFAULT_CHUNKS,
             threads: int | None = None, n_batch: int | None = None, decode_tail: int = 0,
             log: Callable[[str], None] | None = None, settings: dict[str, int] | None = None) -> dict[str, Any]:
    """Perplexity of every config on ``text``; KL, top-1 agreement and KV ratio against the first.
    With ``decode_tail`` N, the last N tokens of each chunk are decoded one at a time and only they
    are scored (instead of the second half)."""
    if not configs:
        raise LorcError("give at least one model")
    if n_chunks < 1:
        raise LorcError(f"--chunks must be at least 1, got {n_chunks}")
    if not 0 <= decode_tail < ctx - 1:
        raise LorcError(f"--decode-tail must be between 0 and --ctx - 2 ({ctx - 2}), got {decode_tail}")
    threads = threads or default_threads()
    n_batch = min(n_batch or ctx, ctx)
    first = ctx - decode_tail if decode_tail else ctx // 2
    base_tokens: list[int] | None = None
    base_lp: list[np.ndarray] = []
    base_kv: float | None = None
    results = []
    for idx, config in enumerate(configs):
        started = time.perf_counter()
        with open_session(config, ctx, n_batch, threads) as s:
            tokens = s.tokenize(text, add_bos=False)
            chunks = make_chunks(tokens, ctx, n_chunks, bos_token(s))
            kv = measure_kv_bytes(s, chunks[0])
            same_tokens = base_tokens is None or tokens[:len(chunks) * ctx] == base_tokens
            scores = _Scores()
            for c, chunk in enumerate(chunks):
                s.clear()
                logits = decode_chunk(s, chunk, first, decode_tail)[:-1]  # rows j = first..ctx-2
                lp = log_softmax(logits)
                targets = np.asarray(chunk[first + 1:])
                scores.nll.append(-lp[np.arange(len(targets)), targets])
                if idx == 0:
                    base_lp.append(lp.astype(np.float32))
                elif same_tokens and base_lp[c].shape == lp.shape:
                    p_lp = base_lp[c].astype(np.float64)
                    scores.kl.append((np.exp(p_lp) * (p_lp - lp)).sum(-1))
                    scores.top1.append(p_lp.argmax(-1) == lp.argmax(-1))
                if log:
                    so_far = float(np.exp(np.concatenate(scores.nll).mean()))
                    log(f"[{config.label}] chunk {c + 1}/{len(chunks)} ppl so far {so_far:.4f}")
        if idx == 0:
            base_tokens = tokens[:len(chunks) * ctx]
            base_kv = kv.per_token
        nll = np.concatenate(scores.nll)
        nll_mean, nll_se = _mean_se(nll)
        ppl = math.exp(nll_mean)
        entry: dict[str, Any] = {
            **config.describe(),
            "lorc": lorc_ranks(config.path),
            "n_chunks": len(chunks),
            "n_scored": int(len(nll)),
            "nll": nll_mean,
            "ppl": ppl,
            "ppl_stderr": ppl * nll_se,
            "kv_bytes_per_token_raw": kv.raw,
            "kv_bytes_per_token": kv.per_token,
            "kv_ratio": kv.per_token / base_kv if base_kv else None,
            "kv_exact_cells": kv.exact_cells,
            "kv_exact_bytes": kv.exact_bytes,
            "kv_bytes_at_ctx": kv.sequence_bytes(ctx),
            "kl_mean": None, "kl_stderr": None, "top1_agreement": None,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if idx == 0:
            entry.update(kl_mean=0.0, kl_stderr=0.0, top1_agreement=1.0)
        elif scores.kl:
            kl = np.concatenate(scores.kl)
            entry["kl_mean"], entry["kl_stderr"] = _mean_se(kl)
            entry["top1_agreement"] = float(np.concatenate(scores.top1).mean())
        else:
            entry["note"] = "tokenization differs from the baseline: no KL / top-1"
        results.append(entry)
    return {
        "tool": "eval",
        "text": {"chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()},
        "ctx": ctx, "chunks_requested": n_chunks, "n_batch": n_batch, "threads": threads,
        "scored": (f"last {decode_tail} tokens of each chunk, decoded one at a time: tokens {first + 1}..{ctx - 1}"
                   if decode_tail else f"second half of each chunk: tokens {first + 1}..{ctx - 1}"),
        "decode_tail": decode_tail,
        "baseline": results[0]["label"],
        "models": results,
        "machine": machine_info(threads),
        "versions": versions(),
        "runtime_overrides": dict(settings or {}),
    }


def format_eval_table(report: dict[str, Any]) -> str:
    rows = [("model", "cache", "FA", "KV B/tok", "raw B/tok", "KV ratio", "exact", f"@{report['ctx']}",
             "PPL", "± se", "KL", "top-1")]
    base_seq = report["models"][0]["kv_bytes_at_ctx"]
    for m in report["models"]:
        rows.append((m["label"], f"{m['cache_type_k']}/{m['cache_type_v']}" if m["cache_type_k"] != m["cache_type_v"]
                     else m["cache_type_k"], "on" if m["flash_attn"] else "off",
                     f"{m['kv_bytes_per_token']:.0f}", f"{m['kv_bytes_per_token_raw']:.0f}",
                     f"{m['kv_ratio']:.3f}", str(m["kv_exact_cells"]) if m["kv_exact_cells"] else "-",
                     f"{m['kv_bytes_at_ctx'] / base_seq:.3f}", f"{m['ppl']:.4f}", f"{m['ppl_stderr']:.4f}",
                     "-" if m["kl_mean"] is None else f"{m['kl_mean']:.4f}",
                     "-" if m["top1_agreement"] is None else f"{100 * m['top1_agreement']:.1f}%"))
    text = _table(rows, right_from=3)
    first = report["models"][0]
    return (f"{text}\n{report['ctx']}-token chunks x {first['n_chunks']}, {first['n_scored']} scored tokens per "
            f"model; KL and top-1 against {report['baseline']}; KV ratio of KV-only bytes per token; exact = "
            f"cells a hybrid cache keeps at full width per sequence (sinks + window); @{report['ctx']} = "
            f"KV-only bytes of a {report['ctx']}-token sequence against the baseline's")


def _table(rows: Sequence[Sequence[str]], right_from: int = 1) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [c.ljust(w) if i < right_from else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- greedy generation (tools/compare.py) ----------------------------------------------------------

DEFAULT_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea.",
    "Explain what a hash table is to a beginner.",
    "List three tips for staying focused while studying.",
    "What is 17 multiplied by 3? Show your reasoning briefly.",
)


def chat_prompt(session: Session, user: str) -> str:
    """``user`` as one user turn in the model's chat template with the assistant turn opened; the
    plain text when the model has no template."""
    lib = session.lib
    tmpl = lib.llama_model_chat_template(session.model, None)
    if not tmpl:
        return user
    msgs = (lib.llama_chat_message * 1)()
    role, content = b"user", user.encode()
    msgs[0].role, msgs[0].content = role, content
    size = 4 * (len(content) + len(tmpl)) + 256
    buf = ctypes.create_string_buffer(size)
    n = lib.llama_chat_apply_template(tmpl, msgs, 1, True, buf, size)
    if n < 0:
        return user
    if n > size:
        buf = ctypes.create_string_buffer(n)
        n = lib.llama_chat_apply_template(tmpl, msgs, 1, True, buf, n)
    return buf.raw[:n].decode(errors="replace")


def tokenize_chat(session: Session, text: str) -> list[int]:
    """Tokens of a templated chat prompt: special tokens (``<|im_start|>``...) parsed as such, BOS
    added only where the vocabulary asks for it (as llama.cpp's chat tools do)."""
    lib = session.lib
    data = text.encode()
    n_max = len(data) + 16
    buf = (lib.llama_token * n_max)()
    n = lib.llama_tokenize(session.vocab, data, len(data), buf, n_max, True, True)
    if n < 0:
        raise LorcError("tokenization of the chat prompt failed")
    return list(buf[:n])


def generate_greedy(session: Session, prompt_tokens: Sequence[int], max_tokens: int) -> list[int]:
    """Greedy (argmax) continuation of ``prompt_tokens`` until an end-of-generation token or
    ``max_tokens``; the end token is not included."""
    if len(prompt_tokens) + max_tokens > session.params.n_ctx:
        raise LorcError(f"prompt ({len(prompt_tokens)} tokens) + {max_tokens} new tokens exceed the "
                        f"context of {session.params.n_ctx}")
    session.clear()
    logits = decode_tokens(session, prompt_tokens)[-1]
    out: list[int] = []
    pos = len(prompt_tokens)
    for _ in range(max_tokens):
        tok = int(np.argmax(logits))
        if session.lib.llama_vocab_is_eog(session.vocab, tok):
            break
        out.append(tok)
        logits = decode_tokens(session, [tok], pos)[-1]
        pos += 1
    return out


def token_agreement(reference: Sequence[int], other: Sequence[int]) -> dict[str, Any]:
    """Agreement of two generations: ``prefix`` identical leading tokens, ``prefix_fraction`` =
    prefix / len(reference), ``overall`` = same token at the same index / max length."""
    prefix = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        prefix += 1
    longest = max(len(reference), len(other))
    same = sum(a == b for a, b in zip(reference, other))
    return {"prefix": prefix, "n_reference": len(reference), "n_other": len(other),
            "prefix_fraction": prefix / len(reference) if reference else float(not other),
            "overall": same / longest if longest else 1.0}


def compare(reference: ModelConfig, other: ModelConfig, prompts: Sequence[str], max_tokens: int = 64,
            threads: int | None = None, n_ctx: int = 2048,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Greedy replies of two models to the same chat prompts and their token agreement."""
    if not prompts:
        raise LorcError("no prompts")
    threads = threads or default_threads()
    replies: dict[str, list[dict[str, Any]]] = {}
    for key, config in (("reference", reference), ("other", other)):
        replies[key] = []
        with open_session(config, n_ctx, min(512, n_ctx), threads) as s:
            for i, p in enumerate(prompts):
                prompt_tokens = tokenize_chat(s, chat_prompt(s, p))
                toks = generate_greedy(s, prompt_tokens, max_tokens)
                replies[key].append({"tokens": toks, "text": s.detokenize(toks)})
                if log:
                    log(f"[{config.label}] prompt {i + 1}/{len(prompts)}: {len(toks)} tokens")
    items = []
    prefix = same_total = longest_total = ref_total = 0
    for p, a, b in zip(prompts, replies["reference"], replies["other"]):
        agr = token_agreement(a["tokens"], b["tokens"])
        items.append({"prompt": p, "reference": a, "other": b, "agreement": agr})
        prefix += agr["prefix"]
        ref_total += agr["n_reference"]
        longest = max(agr["n_reference"], agr["n_other"])
        longest_total += longest
        same_total += round(agr["overall"] * longest)
    return {
        "tool": "compare",
        "reference": reference.describe(), "other": other.describe(),
        "max_tokens": max_tokens,
        "prefix_agreement": prefix / ref_total if ref_total else 1.0,
        "overall_agreement": same_total / longest_total if longest_total else 1.0,
        "identical_replies": sum(it["reference"]["tokens"] == it["other"]["tokens"] for it in items),
        "prompts": items,
        "versions": versions(),
    }


def format_compare(report: dict[str, Any]) -> str:
    ref, oth = report["reference"]["label"], report["other"]["label"]
    out = []
    for i, it in enumerate(report["prompts"], 1):
        a = it["agreement"]
        out.append(f"=== prompt {i}: {it['prompt']}")
        out.append(f"--- {ref} ({a['n_reference']} tokens)")
        out.append(it["reference"]["text"].strip())
        out.append(f"--- {oth} ({a['n_other']} tokens; identical prefix {a['prefix']}, "
                   f"overall {100 * a['overall']:.1f}%)")
        out.append(it["other"]["text"].strip())
        out.append("")
    out.append(f"token agreement of {oth} with {ref}: up to the first divergence "
               f"{100 * report['prefix_agreement']:.1f}%, overall {100 * report['overall_agreement']:.1f}%; "
               f"{report['identical_replies']}/{len(report['prompts'])} replies identical")
    return "\n".join(out)


def read_prompts(path: str | os.PathLike[str] | None) -> list[str]:
    """Built-in prompts, or a file: a JSON list of strings, or one prompt per non-empty line."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    import json

    p = Path(path)
    if not p.is_file():
        raise LorcError(f"prompts file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise LorcError(f"{p}: not valid JSON ({e})") from e
        if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
            raise LorcError(f"{p}: a JSON prompts file must be a list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise LorcError(f"{p} has no prompts")
    return prompts


# --- machine and versions --------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, Any]:
    try:
        import llama_cpp

        backend = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except Exception:  # pragma: no cover - llama_cpp missing
        backend = None
    try:
        load = list(os.getloadavg())
    except OSError:  # pragma: no cover
        load = None
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads, "backend": backend,
            "platform": platform.platform(), "loadavg": load}


def runtime_overrides(args) -> dict[str, int]:
    """The LoRC runtime settings a command line passed for every model (--lorc-sink-tokens,
    --lorc-recent-window): results measured under them are not the files' defaults."""
    return {name: getattr(args, name) for name in ("lorc_sink_tokens", "lorc_recent_window")
            if getattr(args, name) is not None}


def with_settings(configs: Sequence[ModelConfig], settings: dict[str, int]) -> list[ModelConfig]:
    """Every config run with these LoRC runtime settings (an ordinary model ignores them)."""
    return [replace(c, **settings) for c in configs]


def add_settings_arguments(ap) -> None:
    """--lorc-sink-tokens / --lorc-recent-window of the eval and bench commands."""
    ap.add_argument("--lorc-sink-tokens", type=int, metavar="N",
                    help="run every LoRC model with exact K/V for its first N positions (default: each file's "
                         "lorc.sink_tokens; 0 together with --lorc-recent-window 0 = the plain latent cache)")
    ap.add_argument("--lorc-recent-window", type=int, metavar="N",
                    help="run every LoRC model with exact K/V for its last N positions (default: each file's "
                         "lorc.recent_window)")


def versions() -> dict[str, Any]:
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("lorc-gguf", "llama_cpp_python", "gguf", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        from . import runtime

        out["lorc_runtime_format"] = runtime.runtime_format_version()
    except Exception:  # pragma: no cover
        out["lorc_runtime_format"] = None
    return out


def to_json(report: dict[str, Any]) -> str:
    import json

    return json.dumps(report, indent=2, default=lambda o: str(o) if isinstance(o, Path) else asdict(o))


# --- command lines (tools/eval.py, tools/compare.py) -----------------------------------------------

EXIT_ERROR = 2


def _err(msg: str) -> int:
    import sys

    print(f"error: {msg}", file=sys.stderr)
    return EXIT_ERROR


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def eval_parser():
    import argparse

    ap = argparse.ArgumentParser(
        prog="eval.py",
        description="Perplexity (llama-perplexity style), KL and top-1 agreement against the first model, "
                    "and KV bytes per token measured from the runtime, for one or more GGUFs.",
        epilog="MODEL is PATH, PATH@CACHE (K and V) or PATH@CACHE_K,CACHE_V; 'smollm2' names the embedded "
               "SmolLM2-135M-Instruct. The first model is the baseline. Example: "
               "eval.py smollm2 smollm2@q8_0 smollm2@q4_0 lorc.gguf")
    ap.add_argument("models", nargs="*", metavar="MODEL", default=[SMOLLM2_ALIAS],
                    help="models to evaluate (default: smollm2)")
    ap.add_argument("--text", metavar="TEXT,...",
                    help="comma-separated evaluation texts: built-in domains (news, drama: never in the "
                         "calibration text; docs: the pydoc half disjoint from the calibration half) or UTF-8 "
                         f"files (default {','.join(DEFAULT_TEXTS)})")
    ap.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"tokens per chunk (default {DEFAULT_CTX})")
    ap.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help=f"chunks to score (default {DEFAULT_CHUNKS})")
    ap.add_argument("--batch", type=int, help="tokens per llama_decode call (default: --ctx)")
    ap.add_argument("--lorc-top-k", metavar="K,...",
                    help="also run every LoRC model with selective reconstruction of K keys per decoded "
                         "token (lorc_top_k; 0 = all keys), e.g. 0,1024,512; it acts on single-token "
                         "decoding only, so combine it with --decode-tail")
    add_settings_arguments(ap)
    ap.add_argument("--decode-tail", type=int, default=0, metavar="N",
                    help="decode the last N tokens of each chunk one at a time, as generation does, and "
                         "score only them (default 0: prefill whole chunks, score the second half)")
    ap.add_argument("--cache-type-k", default="f16", help="K cache type for models without @ (default f16)")
    ap.add_argument("--cache-type-v", default="f16", help="V cache type for models without @ (default f16; "
                    "a quantized V cache needs flash attention)")
    ap.add_argument("--flash-attn", default="auto", choices=FLASH_ATTN_CHOICES,
                    help="flash attention (default auto = on, as llama.cpp's auto resolves on CPU)")
    ap.add_argument("--threads", type=int, default=default_threads(), help="CPU threads (default: all cores)")
    ap.add_argument("--labels", help="comma-separated labels for the models, in order")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--plot", metavar="PNG", help="write a perplexity vs KV bytes per token plot")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    return ap


def parse_top_k(spec: str | None) -> list[int]:
    if not spec:
        return []
    try:
        values = [int(x) for x in spec.split(",")]
    except ValueError:
        raise LorcError(f"--lorc-top-k takes comma-separated integers, got '{spec}'") from None
    for v in values:
        if v < 0:
            raise LorcError(f"--lorc-top-k values must be >= 0, got {v}")
    return values


def has_latent_keys(path: str | os.PathLike[str]) -> bool:
    """Whether a GGUF caches latent keys in some layer (a rank equal to the width is a dense layer)."""
    info = gguf_info(path)
    return bool(info["lorc_version"] and info["key_rank"]
                and any(0 < r < (info["key_width"] or 0) for r in info["key_rank"]))


def expand_top_k(configs: Sequence[ModelConfig], top_ks: Sequence[int]) -> list[ModelConfig]:
    """Each config with latent keys once per top-k value (in place of itself); the others (the
    original, a --values-only file: nothing to select) unchanged."""
    if not top_ks:
        return list(configs)
    out = []
    for c in configs:
        if has_latent_keys(c.path):
            out += [with_top_k(c, k) for k in top_ks]
        else:
            out.append(c)
    check_unique_labels(out)
    return out


def _labels(spec: str | None, n: int) -> list[str | None]:
    if spec is None:
        return [None] * n
    labels = [x.strip() for x in spec.split(",")]
    if len(labels) != n:
        raise LorcError(f"--labels has {len(labels)} entries for {n} models")
    return labels


def run_cli(produce: Callable[[], dict[str, Any]], fmt: Callable[[dict[str, Any]], str], json_path: str | None,
            plot: Callable[[dict[str, Any], str], None] | None = None, plot_path: str | None = None) -> int:
    """The common end of the eval/bench/compare commands: run ``produce``, write the JSON (and the
    plot), print the table; a LorcError or OSError becomes one ``error:`` line and exit status 2."""
    try:
        report = produce()
        if json_path:
            Path(json_path).write_text(to_json(report) + "\n")
        if plot is not None and plot_path:
            plot(report, plot_path)
    except LorcError as e:
        return _err(str(e))
    except OSError as e:
        return _err(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
    print(fmt(report))
    sys.stdout.flush()
    return 0


def _plot_pareto(report: dict[str, Any], path: str) -> None:
    from .plots import plot_pareto

    plot_pareto(report, path)


def evaluate_texts(configs: Sequence[ModelConfig], texts: Sequence[str], log: Callable[[str], None] | None = None,
                   **kwargs: Any) -> dict[str, Any]:
    """``evaluate`` on each text (a domain or a file, see ``read_text``); one text gives its report
    as it is, several give ``{"tool": "eval", "reports": [...], "summary": ...}`` with every
    model's perplexity change against the baseline per text."""
    reports = []
    for spec in texts:
        text, source = read_text(spec)
        if log:
            log(f"text {spec}: {source}")
        report = evaluate(configs, text, log=log, **kwargs)
        report["text"].update(name=str(spec), source=source)
        reports.append(report)
    if len(reports) == 1:
        return reports[0]
    summary = [{"label": m["label"],
                "ppl": {r["text"]["name"]: r["models"][i]["ppl"] for r in reports},
                "vs_baseline": {r["text"]["name"]: r["models"][i]["ppl"] / r["models"][0]["ppl"] - 1 for r in reports},
                "kl_mean": {r["text"]["name"]: r["models"][i]["kl_mean"] for r in reports}}
               for i, m in enumerate(reports[0]["models"])]
    return {"tool": "eval", "texts": [r["text"]["name"] for r in reports], "reports": reports, "summary": summary}


def format_eval_report(report: dict[str, Any]) -> str:
    """One table per text, then (several texts) perplexity and KL per model and text."""
    if "reports" not in report:
        return format_eval_table(report)
    parts = [f"== {r['text']['name']}: {r['text']['source']}\n{format_eval_table(r)}" for r in report["reports"]]
    names = report["texts"]
    rows = [("model", *(f"{n} ppl (vs base, KL)" for n in names))]
    for m in report["summary"]:
        rows.append((m["label"], *(f"{m['ppl'][n]:.4f} ({100 * m['vs_baseline'][n]:+.2f}%, "
                                   f"{'-' if m['kl_mean'][n] is None else format(m['kl_mean'][n], '.4f')})"
                                   for n in names)))
    return "\n\n".join(parts + ["== summary\n" + _table(rows)])


def eval_main(argv: Sequence[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)

    def produce() -> dict[str, Any]:
        fa = parse_flash_attn(args.flash_attn)
        labels = _labels(args.labels, len(args.models))
        configs = [parse_model_spec(m, args.cache_type_k, args.cache_type_v, fa, lab)
                   for m, lab in zip(args.models, labels)]
        settings = runtime_overrides(args)
        configs = expand_top_k(with_settings(configs, settings), parse_top_k(args.lorc_top_k))
        texts = parse_texts(args.text)
        if args.plot and len(texts) > 1:
            raise LorcError("--plot draws one text: give a single --text")
        return evaluate_texts(configs, texts, ctx=args.ctx, n_chunks=args.chunks, threads=args.threads,
                              n_batch=args.batch, decode_tail=args.decode_tail,
                              log=None if args.quiet else _stderr, settings=settings)

    return run_cli(produce, format_eval_report, args.json, _plot_pareto, args.plot)


def compare_parser():
    import argparse

    ap = argparse.ArgumentParser(
        prog="compare.py",
        description="Greedy replies of an original and a LoRC model to the same chat prompts, with their "
                    "token agreement.")
    ap.add_argument("reference", metavar="ORIGINAL", help="reference model (PATH[@CACHE] or 'smollm2')")
    ap.add_argument("other", metavar="LORC", help="model compared against it (PATH[@CACHE])")
    ap.add_argument("--prompts", metavar="FILE", help="one prompt per line, or a JSON list of strings "
                    "(default: a few built-in prompts)")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per reply at most (default 64)")
    ap.add_argument("--ctx", type=int, default=2048, help="context size (default 2048)")
    ap.add_argument("--flash-attn", default="auto", choices=FLASH_ATTN_CHOICES)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--json", metavar="PATH", help="write replies and agreement as JSON")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    return ap


def compare_main(argv: Sequence[str] | None = None) -> int:
    args = compare_parser().parse_args(argv)

    def produce() -> dict[str, Any]:
        fa = parse_flash_attn(args.flash_attn)
        if args.max_tokens < 1:
            raise LorcError("--max-tokens must be at least 1")
        ref = parse_model_spec(args.reference, flash_attn=fa)
        other = parse_model_spec(args.other, flash_attn=fa)
        if ref.label == other.label:
            other = ModelConfig(other.path, other.cache_type_k, other.cache_type_v, other.flash_attn,
                                other.label + " (2)")
        prompts = read_prompts(args.prompts)
        return compare(ref, other, prompts, max_tokens=args.max_tokens, threads=args.threads, n_ctx=args.ctx,
                       log=None if args.quiet else _stderr)

    return run_cli(produce, format_compare, args.json)
