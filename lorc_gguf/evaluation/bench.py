"""Prefill and decode speed of an original model, its LoRC conversions and llama.cpp's quantized
caches, at several context lengths (``tools/bench.py``).

One measurement of a configuration at context ``n``: clear the cache, decode an ``n``-token
prompt in ``n_batch`` chunks with logits only for the last token (prefill), then drop the last
``D`` cells (``seq_rm``) and decode ``D`` fixed tokens one per call with logits (decode at depth
``n - D``). The prompt is real text (the evaluation half of the pydoc text). All configurations
live in one process; every repeat runs each configuration once, in an order rotated per repeat,
and the median over repeats is reported.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..corpus import eval_text
from ..errors import LorcError
from ..format.info import gguf_info, lorc_ranks
from ..runtime.decoding import bos_token, decode_tokens
from .configs import QUANTIZED_CACHE_TYPES, ModelConfig, check_unique_labels, default_threads, make_config, open_session
from .kv import measure_kv_bytes
from .machine import machine_info, versions
from .tables import table

DEFAULT_CONTEXTS = (512, 2048, 4096, 8192)
QUICK_CONTEXTS = (256, 1024)
DEFAULT_REPEATS = 3
DEFAULT_DECODE_TOKENS = 32
DEFAULT_BATCH = 512
DEFAULT_WIDTHS = (0.5,)
MIB = 1 << 20


def n_ctx_train(path: str | os.PathLike[str]) -> int | None:
    return gguf_info(path)["n_ctx_train"]


def default_contexts(train: int | None, quick: bool = False) -> list[int]:
    """512, 2048, 4096 and 8192 (quick: 256, 1024), keeping those the model was trained for."""
    base = QUICK_CONTEXTS if quick else DEFAULT_CONTEXTS
    kept = [c for c in base if train is None or c <= train]
    return kept or [min(base[0], train or base[0])]


def lorc_cache_path(cache_dir: Path, original: Path, width: float) -> Path:
    return cache_dir / f"{original.stem}.lorc-progressive-{width:g}.gguf"


def convert_widths(original: Path, widths: Sequence[float], cache_dir: Path, reconvert: bool = False,
                   log: Callable[[str], None] | None = None) -> list[Path]:
    """Progressive LoRC conversions of ``original`` at each kept width, reused from ``cache_dir``
    when newer than the original (``reconvert`` forces them)."""
    from ..converter.pipeline import convert

    cache_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for w in widths:
        dst = lorc_cache_path(cache_dir, original, w)
        if reconvert or not dst.is_file() or dst.stat().st_mtime < original.stat().st_mtime:
            if log:
                log(f"converting {original.name} at width {w:g} -> {dst}")
            convert(original, dst, allocation="progressive", ratio=w, progress=False)
        out.append(dst)
    return out


def build_configs(original: ModelConfig, lorc: Sequence[Path], cache_types: Sequence[str],
                  lorc_cache_types: Sequence[str], flash_attn: bool | None) -> list[ModelConfig]:
    """original f16, each LoRC f16, original with each other cache type, each LoRC with each other
    (latent) cache type. With flash attention off, the quantized caches (whose V needs it) run with
    it on, and their labels say so: the f16 configs then run their fastest CPU path. A bf16 or f32
    cache runs as asked."""
    configs = [original]
    lorc_configs = [make_config(p, flash_attn=flash_attn) for p in lorc]
    configs += lorc_configs

    def with_cache(c: ModelConfig, t: str) -> ModelConfig:
        if t in QUANTIZED_CACHE_TYPES and flash_attn is False:
            return make_config(c.path, t, t, True, f"{c.label} [{t}, flash attention]")
        return make_config(c.path, t, t, flash_attn, f"{c.label} [{t}]")

    configs += [with_cache(original, t) for t in cache_types]
    configs += [with_cache(c, t) for c in lorc_configs for t in lorc_cache_types]
    check_unique_labels(configs)
    return configs


def prefill(session, prompt: Sequence[int], n_ctx: int, n_decode: int) -> float:
    """Seconds to prefill ``n_ctx`` tokens of ``prompt`` into a cleared ``session``, which is then cut back
    to depth ``n_ctx - n_decode`` for the decoded tokens."""
    return prefill_interleaved([session], [prompt], n_ctx, n_decode)[0]


def prefill_interleaved(sessions: Sequence, prompts: Sequence[Sequence[int]], n_ctx: int,
                        n_decode: int) -> list[float]:
    """``prefill`` for every session at once, taken in turn by spans of the largest n_batch: each
    session prefills the span in its own n_batch chunks (logits for the prompt's last token only), then
    the next session does, each session's seconds summed over its own chunks; then every session is cut
    back to depth ``n_ctx - n_decode``. Every n_batch must divide the largest, so that each span ends on
    a chunk boundary of every session."""
    for s in sessions:
        s.clear()
    batches = [s.params.n_batch for s in sessions]
    span = max(batches)
    if any(span % nb for nb in batches):
        raise LorcError(f"interleaved prefill needs prompt batches that divide the largest: {sorted(set(batches))}")
    secs = [0.0] * len(sessions)
    for start in range(0, n_ctx, span):
        for j, (s, p, nb) in enumerate(zip(sessions, prompts, batches)):
            for c0 in range(start, min(start + span, n_ctx), nb):
                c1 = min(c0 + nb, n_ctx)
                t0 = time.perf_counter()
                # no logits but for the prompt's last token: outputs from index c1 - c0 is none of the chunk's
                decode_tokens(s, list(p[c0:c1]), c0, outputs_from=None if c1 == n_ctx else c1 - c0)
                secs[j] += time.perf_counter() - t0
    depth = n_ctx - n_decode
    for s in sessions:
        if not s.seq_rm(0, depth, -1):
            # an exact window refuses a cut past its overwritten cells (more than n_ubatch tokens back)
            raise LorcError(f"the cache refused to cut the prompt back to {depth} tokens: decode fewer than "
                            f"{n_decode} tokens or raise n_ubatch")
    return secs


def decode_one(session, prompt: Sequence[int], pos: int) -> float:
    """Seconds of one single-token decode call: the prompt's token at ``pos``."""
    t0 = time.perf_counter()
    decode_tokens(session, [prompt[pos]], pos)
    return time.perf_counter() - t0


def measure(session, prompt: Sequence[int], n_ctx: int, n_decode: int) -> tuple[float, list[float], int]:
    """(prefill seconds for ``n_ctx`` tokens, the seconds of each of ``n_decode`` single-token calls at
    depth ``n_ctx - n_decode``, the bytes of the n_ctx-token sequence's serialized state: every
    cell its caches hold, 12 bytes of metadata each, and a header)."""
    return measure_interleaved([session], [prompt], n_ctx, n_decode)[0]


def measure_interleaved(sessions: Sequence, prompts: Sequence[Sequence[int]], n_ctx: int,
                        n_decode: int) -> list[tuple[float, list[float], int]]:
    """``measure`` for every session at once, the prompt's chunks and the decoded tokens taken in turn:
    each session prefills the prompt's first span (its chunks of the largest n_batch), then each the
    second, ...; then each decodes its first token, then each its second, ... A machine whose speed
    drifts over seconds (a shared virtual machine) then slows every configuration alike, where
    measuring them one after another puts the drift between them."""
    pf = prefill_interleaved(sessions, prompts, n_ctx, n_decode)
    dec: list[list[float]] = [[] for _ in sessions]
    depth = n_ctx - n_decode
    for i in range(n_decode):
        for j, (s, p) in enumerate(zip(sessions, prompts)):
            dec[j].append(decode_one(s, p, depth + i))
    out = []
    for s, a, b in zip(sessions, pf, dec):
        out.append((a, b, s.seq_state_size(0)))
        s.clear()
    return out


def paired_speedup(base: Sequence[Sequence[float]], other: Sequence[Sequence[float]]) -> dict[str, float]:
    """Decode speed against the first config from interleaved runs (each repeat's seconds of each
    decoded token), token by token: for each decoded token (each repeat's i-th, measured in the same
    round as the first config's i-th) the ratio of the first config's seconds to this one's; their
    median and quartiles. A stall of the machine lands on a few tokens of one config, where it moves a
    ratio of sums; a slow drift over seconds moves both tokens of a pair alike."""
    ratios = sorted(b / o for bt, ot in zip(base, other) for b, o in zip(bt, ot))
    if not ratios:
        raise LorcError("no decoded tokens to compare")
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": q[1], "q1": q[0], "q3": q[2], "tokens": len(ratios)}


def paired_prefill_speedup(base: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    """Prefill speed against the first config from interleaved runs: for each repeat the ratio of the
    first config's prefill seconds to this one's, both measured chunk by chunk in the same round (a
    drift of the machine over minutes moves both alike); their median, least and greatest."""
    ratios = sorted(b / o for b, o in zip(base, other))
    if not ratios:
        raise LorcError("no prefills to compare")
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1], "repeats": len(ratios)}


def _prompt(session, n: int) -> list[int]:
    text = eval_text()
    text_tokens = session.tokenize(text[:16 * n + 1024], add_bos=False)  # ~4 characters a token
    bos = bos_token(session)
    tokens = ([bos] if bos is not None else []) + text_tokens
    while len(tokens) < n:
        tokens += text_tokens
    return tokens[:n]


def run_bench(configs: Sequence[ModelConfig], contexts: Sequence[int], repeats: int = DEFAULT_REPEATS,
              decode_tokens_n: int = DEFAULT_DECODE_TOKENS, threads: int | None = None, n_batch: int = DEFAULT_BATCH,
              budget_mib: float | None = None, log: Callable[[str], None] | None = None,
              settings: dict[str, int] | None = None, interleave: bool = False) -> dict[str, Any]:
    if not configs:
        raise LorcError("no configurations to benchmark")
    if repeats < 1:
        raise LorcError("--repeats must be at least 1")
    if decode_tokens_n < 1:
        raise LorcError("--decode-tokens must be at least 1")
    contexts = sorted(set(int(c) for c in contexts))
    if not contexts or contexts[0] <= decode_tokens_n:
        raise LorcError(f"every context must exceed --decode-tokens ({decode_tokens_n}): {contexts}")
    threads = threads or default_threads()
    machine = machine_info(threads)
    started = time.perf_counter()
    kv: dict[str, tuple[float, float]] = {}
    results = []
    for n_ctx in contexts:
        sessions = [open_session(c, n_ctx, min(c.n_batch or n_batch, n_ctx), threads) for c in configs]
        try:
            prompts = [_prompt(s, n_ctx) for s in sessions]
            for c, s, p in zip(configs, sessions, prompts):
                if c.label not in kv:
                    kv[c.label] = measure_kv_bytes(s, p)
            times: dict[str, list[tuple[float, list[float]]]] = {c.label: [] for c in configs}
            batch = {c.label: s.params.n_batch for c, s in zip(configs, sessions)}
            buffers = {c.label: (s.kv_buffer_bytes, s.compute_buffer_bytes) for c, s in zip(configs, sessions)}
            state: dict[str, int] = {}
            for r in range(repeats):
                k = r % len(configs)
                order = list(range(len(configs)))[k:] + list(range(len(configs)))[:k]
                if interleave:
                    measured = measure_interleaved([sessions[i] for i in order], [prompts[i] for i in order],
                                                   n_ctx, decode_tokens_n)
                else:
                    measured = [measure(sessions[i], prompts[i], n_ctx, decode_tokens_n) for i in order]
                for i, (pf, dec, state[configs[i].label]) in zip(order, measured):
                    times[configs[i].label].append((pf, dec))
                    if log:
                        log(f"ctx {n_ctx} repeat {r + 1}/{repeats} {configs[i].label}: "
                            f"prefill {n_ctx / pf:.1f} tok/s, decode {decode_tokens_n / sum(dec):.2f} tok/s")
        finally:
            for s in sessions:
                s.close()
        base = [t[1] for t in times[configs[0].label]]
        base_pf = [t[0] for t in times[configs[0].label]]
        for c in configs:
            pf = [t[0] for t in times[c.label]]
            tokens = [t[1] for t in times[c.label]]
            dec = [sum(t) for t in tokens]
            row = {"config": c.label, "n_ctx": n_ctx, "prefill_tokens": n_ctx,
                   "decode_tokens": decode_tokens_n, "decode_depth": n_ctx - decode_tokens_n,
                   "prefill_s": pf, "decode_s": dec,
                   "prefill_tps": n_ctx / statistics.median(pf),
                   "decode_tps": decode_tokens_n / statistics.median(dec),
                   "state_bytes": state[c.label], "n_batch": batch[c.label],
                   "kv_buffer_bytes": buffers[c.label][0], "compute_buffer_bytes": buffers[c.label][1]}
            if interleave:
                row["decode_token_s"] = tokens
                row["decode_speedup"] = paired_speedup(base, tokens)
                row["prefill_speedup"] = paired_prefill_speedup(base_pf, pf)
            results.append(row)
    machine["loadavg_end"] = list(os.getloadavg())
    config_rows = []
    for c in configs:
        b = kv[c.label]
        row = {**c.describe(), "kv_bytes_per_token_raw": b.raw, "kv_bytes_per_token": b.per_token,
               "kv_ratio": b.per_token / kv[configs[0].label].per_token,
               "kv_exact_cells": b.exact_cells, "kv_exact_bytes": b.exact_bytes,
               "n_ctx_train": n_ctx_train(c.path), "n_batch": c.n_batch or n_batch}
        ranks = lorc_ranks(c.path)
        if ranks:
            row["lorc_kept_width"] = ((sum(ranks["key_rank"]) + sum(ranks["value_rank"]))
                                      / (len(ranks["key_rank"]) * (ranks["key_width"] + ranks["value_width"])))
        if budget_mib is not None:
            row["budget_ctx"] = max(0, int((budget_mib * MIB - b.exact_bytes) // b.per_token))
        config_rows.append(row)
    return {"tool": "bench", "machine": machine, "versions": versions(), "runtime_overrides": dict(settings or {}),
            "settings": {"contexts": contexts, "repeats": repeats, "decode_tokens": decode_tokens_n,
                         "n_batch": n_batch, "threads": threads, "budget_mib": budget_mib,
                         "statistic": "median over repeats",
                         "decode_speedup": ("interleaved runs only: the median and quartiles over decoded tokens "
                                            "of the first config's seconds for its token over this config's "
                                            "for the same token of the same round"),
                         "prefill_speedup": ("interleaved runs only: the median, least and greatest over repeats "
                                             "of the first config's prefill seconds over this config's in the "
                                             "same round"),
                         "prefill": "n_ctx-token prompt in n_batch chunks, logits for the last token only",
                         "decode": "single-token decode calls with logits at depth n_ctx - decode_tokens",
                         "decode_order": ("interleaved: every config's i-th prompt chunk and i-th decoded token before any "
                                          "config's (i+1)-th"
                                          if interleave else "one config after another")},
            "configs": config_rows, "results": results,
            "elapsed_s": round(time.perf_counter() - started, 1)}


def memory_report(configs: Sequence[ModelConfig], contexts: Sequence[int], threads: int | None = None,
                  n_batch: int = DEFAULT_BATCH, log: Callable[[str], None] | None = None,
                  settings: dict[str, int] | None = None) -> dict[str, Any]:
    """What llama.cpp allocates for each config's context at each length, without running it: its KV
    cache buffers and the compute buffers it reserves for its graphs (one context open at a time)."""
    if not configs:
        raise LorcError("no configurations to measure")
    contexts = sorted(set(int(c) for c in contexts))
    threads = threads or default_threads()
    results = []
    for n_ctx in contexts:
        for c in configs:
            with open_session(c, n_ctx, min(c.n_batch or n_batch, n_ctx), threads) as s:
                results.append({"config": c.label, "n_ctx": n_ctx, "n_batch": s.params.n_batch,
                                "kv_buffer_bytes": s.kv_buffer_bytes, "compute_buffer_bytes": s.compute_buffer_bytes})
            if log:
                r = results[-1]
                log(f"ctx {n_ctx} {c.label}: KV {r['kv_buffer_bytes'] / MIB:.1f} MiB, "
                    f"compute {r['compute_buffer_bytes'] / MIB:.1f} MiB")
    return {"tool": "bench", "mode": "memory", "machine": machine_info(threads), "versions": versions(),
            "runtime_overrides": dict(settings or {}),
            "settings": {"contexts": contexts, "n_batch": n_batch, "threads": threads,
                         "kv_buffer": "the KV cache buffers llama.cpp allocated for the context (every store)",
                         "compute_buffer": "the compute buffers llama.cpp reserved for the context's graphs"},
            "configs": [c.describe() for c in configs], "results": results}


def format_memory(report: dict[str, Any]) -> str:
    contexts = report["settings"]["contexts"]
    by = {(r["config"], r["n_ctx"]): r for r in report["results"]}
    rows = [["config", "cache"] + [f"KV + compute MiB @{n}" for n in contexts]]
    for c in report["configs"]:
        row = [c["label"], c["cache_type_k"] if c["cache_type_k"] == c["cache_type_v"]
               else f"{c['cache_type_k']}/{c['cache_type_v']}"]
        for n in contexts:
            r = by[(c["label"], n)]
            kv, comp = r["kv_buffer_bytes"] or 0, r["compute_buffer_bytes"] or 0
            row.append(f"{kv / MIB:.1f} + {comp / MIB:.1f} = {(kv + comp) / MIB:.1f}")
        rows.append(row)
    return (table(rows, right_from=2) +
            f"\nMiB llama.cpp allocated for one context (n_batch = n_ubatch = {report['settings']['n_batch']} unless the "
            f"label says otherwise): its KV cache buffers (a LoRC file: the latent and the exact store) + the compute "
            f"buffers reserved for its graphs; nothing run")


def format_bench(report: dict[str, Any]) -> str:
    if report.get("mode") == "memory":
        return format_memory(report)
    contexts = report["settings"]["contexts"]
    by = {(r["config"], r["n_ctx"]): r for r in report["results"]}
    head = (["config", "cache", "KV B/tok", "ratio", "exact"] + [f"pp/tg @{c}" for c in contexts] +
            [f"MiB @{contexts[-1]}", f"compute MiB @{contexts[-1]}"])
    budget = report["settings"].get("budget_mib")
    if budget is not None:
        head.append(f"ctx in {budget:g} MiB")
    rows = [head]
    for c in report["configs"]:
        row = [c["label"],
               c["cache_type_k"] if c["cache_type_k"] == c["cache_type_v"] else f"{c['cache_type_k']}/{c['cache_type_v']}",
               f"{c['kv_bytes_per_token']:.0f}", f"{c['kv_ratio']:.3f}",
               str(c["kv_exact_cells"]) if c["kv_exact_cells"] else "-"]
        for n in contexts:
            r = by[(c["label"], n)]
            paired = (f" x{r['prefill_speedup']['median']:.2f}/{r['decode_speedup']['median']:.2f}"
                      if "decode_speedup" in r else "")
            row.append(f"{r['prefill_tps']:.0f}/{r['decode_tps']:.1f}{paired}")
        last = by[(c["label"], contexts[-1])]
        row.append(f"{last['state_bytes'] / MIB:.1f}" if "state_bytes" in last else "-")
        row.append(f"{last['compute_buffer_bytes'] / MIB:.1f}" if last.get("compute_buffer_bytes") is not None else "-")
        if budget is not None:
            row.append(str(c["budget_ctx"]))
        rows.append(row)
    m = report["machine"]
    s = report["settings"]
    return (table(rows, right_from=2) +
            f"\npp = prefill tok/s, tg = decode tok/s ({s['decode_tokens']} tokens at depth n_ctx-{s['decode_tokens']}"
            f"{'; prompt chunks and tokens interleaved across configs, x = paired speed against the first row, prefill (median over repeats) / decode (median over tokens)' if s.get('decode_order', '').startswith('interleaved') else ''}),"
            f" median of {s['repeats']}; {m['cpu']}, {s['threads']} threads, load {m['loadavg'][0]:.1f} -> "
            f"{m['loadavg_end'][0]:.1f}; exact = cells a hybrid cache keeps at full width per sequence "
            f"(sinks + window), not in KV B/tok; MiB = the serialized state of one sequence at the largest context "
            f"(every cell held for it, swa_full off); compute MiB = the compute buffers llama.cpp reserved for "
            f"that context's graphs (a full prompt batch at the full context)")
