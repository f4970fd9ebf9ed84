"""Perplexity, KL divergence and KV bytes per token of GGUF models run by the patched runtime.

What ``tools/eval.py`` computes, llama-perplexity style: the text is tokenized once (no BOS),
cut into chunks of ``ctx`` tokens (``runtime.tokens.make_chunks``), and each chunk is evaluated in
a fresh cache with its first token replaced by BOS. Only the second half of a chunk is scored: the
NLL of token ``j+1`` given the logits at ``j`` for ``j`` in ``[ctx/2, ctx-1)``. The first model
given is the baseline: every other model gets the mean KL(baseline || model), the top-1
agreement and its perplexity change with a standard error (``metrics.paired_change``) over the same
scored positions, and its KV bytes per token (measured from the runtime) as a ratio of the
baseline's. Every scored token's NLL is kept in the report. Several texts (``texts``) give one
report each and a summary.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LorcError
from ..format.info import gguf_info, lorc_ranks
from ..runtime.decoding import bos_token, decode_tokens
from ..runtime.session import Session
from ..runtime.tokens import make_chunks
from .configs import ModelConfig, default_threads, open_session
from .kv import measure_kv_bytes
from .machine import machine_info, versions
from .metrics import PAIRED_BATCH, kl_rows, log_softmax, mean_se, paired_change
from .tables import table
from .texts import read_text

DEFAULT_CTX = 512
DEFAULT_CHUNKS = 8


@dataclass
class _Scores:
    nll: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)


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
    if ctx < 4:
        raise LorcError(f"--ctx must be at least 4, got {ctx}")
    if n_chunks < 1:
        raise LorcError(f"--chunks must be at least 1, got {n_chunks}")
    if not 0 <= decode_tail < ctx - 1:
        raise LorcError(f"--decode-tail must be between 0 and --ctx - 2 ({ctx - 2}), got {decode_tail}")
    threads = threads or default_threads()
    n_batch = min(n_batch or ctx, ctx)
    first = ctx - decode_tail if decode_tail else ctx // 2
    base_tokens: list[int] | None = None
    base_lp: list[np.ndarray] = []
    base_nll: list[np.ndarray] = []
    base_kv: float | None = None
    results = []
    for idx, config in enumerate(configs):
        started = time.perf_counter()
        with open_session(config, ctx, n_batch, threads) as s:
            tokens = s.tokenize(text, add_bos=False)
            chunks = make_chunks(tokens, ctx, bos_token(s), n_chunks).tolist()
            kv = measure_kv_bytes(s, chunks[0])
            at_ctx = kv.sequence_bytes(ctx)
            sliding = bool(gguf_info(config.path)["sliding_window"])
            same_tokens = base_tokens is None or tokens[:len(chunks) * ctx] == base_tokens
            scores = _Scores()
            for c, chunk in enumerate(chunks):
                s.clear()
                logits = decode_chunk(s, chunk, first, decode_tail)[:-1]  # rows j = first..ctx-2
                if c == 0 and sliding:
                    # sliding-window layers hold their window, not the context (the session runs
                    # with swa_full off): the first chunk's state, every cell held for it, measured
                    at_ctx = s.seq_state_size(0)
                lp = log_softmax(logits)
                targets = np.asarray(chunk[first + 1:])
                scores.nll.append(-lp[np.arange(len(targets)), targets])
                if idx == 0:
                    base_lp.append(lp.astype(np.float32))
                elif same_tokens and base_lp[c].shape == lp.shape:
                    p_lp = base_lp[c].astype(np.float64)
                    scores.kl.append(kl_rows(p_lp, lp))
                    scores.top1.append(p_lp.argmax(-1) == lp.argmax(-1))
                if log:
                    so_far = float(np.exp(np.concatenate(scores.nll).mean()))
                    log(f"[{config.label}] chunk {c + 1}/{len(chunks)} ppl so far {so_far:.4f}")
        if idx == 0:
            base_tokens = tokens[:len(chunks) * ctx]
            base_kv = kv.per_token
            base_nll = scores.nll
        nll = np.concatenate(scores.nll)
        nll_mean, nll_se = mean_se(nll)
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
            "kv_bytes_at_ctx": at_ctx,
            "kl_mean": None, "kl_stderr": None, "top1_agreement": None,
            "ppl_change": None, "ppl_change_stderr": None,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if idx == 0:
            entry.update(kl_mean=0.0, kl_stderr=0.0, top1_agreement=1.0, ppl_change=0.0, ppl_change_stderr=0.0)
        elif scores.kl:
            kl = np.concatenate(scores.kl)
            entry["kl_mean"], entry["kl_stderr"] = mean_se(kl)
            entry["top1_agreement"] = float(np.concatenate(scores.top1).mean())
            change, change_se = paired_change(base_nll, scores.nll)
            # fewer than two batches of scored tokens give no error estimate
            entry.update(ppl_change=change, ppl_change_stderr=change_se if math.isfinite(change_se) else None)
        else:
            entry["note"] = "tokenization differs from the baseline: no KL / top-1"
        # every scored token's NLL, chunk after chunk: other statistics can be taken from the report
        entry["token_nll"] = [round(float(x), 6) for x in nll]
        results.append(entry)
    return {
        "tool": "eval",
        "text": {"chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()},
        "ctx": ctx, "chunks_requested": n_chunks, "n_batch": n_batch, "threads": threads,
        "scored": (f"last {decode_tail} tokens of each chunk, decoded one at a time: tokens {first + 1}..{ctx - 1}"
                   if decode_tail else f"second half of each chunk: tokens {first + 1}..{ctx - 1}"),
        "decode_tail": decode_tail,
        "baseline": results[0]["label"],
        "paired_batch": PAIRED_BATCH,
        "models": results,
        "machine": machine_info(threads),
        "versions": versions(),
        "runtime_overrides": dict(settings or {}),
    }


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
                "vs_baseline_stderr": {r["text"]["name"]: r["models"][i]["ppl_change_stderr"] for r in reports},
                "kl_mean": {r["text"]["name"]: r["models"][i]["kl_mean"] for r in reports}}
               for i, m in enumerate(reports[0]["models"])]
    return {"tool": "eval", "texts": [r["text"]["name"] for r in reports], "reports": reports, "summary": summary}


def format_eval_table(report: dict[str, Any]) -> str:
    rows = [("model", "cache", "FA", "KV B/tok", "raw B/tok", "KV ratio", "exact", f"@{report['ctx']}",
             "PPL", "± se", "vs base (± se)", "KL", "top-1")]
    base_seq = report["models"][0]["kv_bytes_at_ctx"]
    for m in report["models"]:
        rows.append((m["label"], f"{m['cache_type_k']}/{m['cache_type_v']}" if m["cache_type_k"] != m["cache_type_v"]
                     else m["cache_type_k"], "on" if m["flash_attn"] else "off",
                     f"{m['kv_bytes_per_token']:.0f}", f"{m['kv_bytes_per_token_raw']:.0f}",
                     f"{m['kv_ratio']:.3f}", str(m["kv_exact_cells"]) if m["kv_exact_cells"] else "-",
                     f"{m['kv_bytes_at_ctx'] / base_seq:.3f}", f"{m['ppl']:.4f}", f"{m['ppl_stderr']:.4f}",
                     _change(m),
                     "-" if m["kl_mean"] is None else f"{m['kl_mean']:.4f}",
                     "-" if m["top1_agreement"] is None else f"{100 * m['top1_agreement']:.1f}%"))
    text = table(rows, right_from=3)
    first = report["models"][0]
    return (f"{text}\n{report['ctx']}-token chunks x {first['n_chunks']}, {first['n_scored']} scored tokens per "
            f"model; KL, top-1 and perplexity change against {report['baseline']} (its standard error "
            f"from means of {report.get('paired_batch', PAIRED_BATCH)} consecutive tokens' NLL differences); "
            f"KV ratio of KV-only bytes per token; exact = "
            f"cells a hybrid cache keeps at full width per sequence (sinks + window); @{report['ctx']} = "
            f"KV-only bytes of a {report['ctx']}-token sequence against the baseline's (sliding-window models: "
            f"its measured state with swa_full off)")


def _change(m: dict[str, Any]) -> str:
    if m.get("ppl_change") is None:
        return "-"
    return f"{100 * m['ppl_change']:+.2f}%{_se(m['ppl_change_stderr'])}"


def _se(stderr: float | None) -> str:
    return "" if not stderr else f" ±{100 * stderr:.2f}"


def format_eval_report(report: dict[str, Any]) -> str:
    """One table per text, then (several texts) perplexity and KL per model and text."""
    if "reports" not in report:
        return format_eval_table(report)
    parts = [f"== {r['text']['name']}: {r['text']['source']}\n{format_eval_table(r)}" for r in report["reports"]]
    names = report["texts"]
    rows = [("model", *(f"{n} ppl (vs base, KL)" for n in names))]
    for m in report["summary"]:
        rows.append((m["label"], *(f"{m['ppl'][n]:.4f} ({100 * m['vs_baseline'][n]:+.2f}%"
                                   f"{_se(m['vs_baseline_stderr'][n])}, "
                                   f"{'-' if m['kl_mean'][n] is None else format(m['kl_mean'][n], '.4f')})"
                                   for n in names)))
    return "\n\n".join(parts + ["== summary\n" + table(rows)])
