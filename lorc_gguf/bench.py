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

from .errors import LorcError
from .evaluate import (FLASH_ATTN_CHOICES, SMOLLM2_ALIAS, ModelConfig, _table, add_settings_arguments, bos_token,
                       check_unique_labels, decode_tokens, default_threads, eval_text, expand_top_k, gguf_info,
                       lorc_ranks, machine_info, make_config, measure_kv_bytes, open_session, parse_flash_attn,
                       parse_top_k, resolve_model_path, runtime_overrides, versions, with_settings)

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
    from .convert import convert

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
    """original f16, each LoRC f16, original with each quantized cache, each LoRC with each
    quantized (latent) cache."""
    configs = [original]
    lorc_configs = [make_config(p, flash_attn=flash_attn) for p in lorc]
    configs += lorc_configs
    configs += [make_config(original.path, t, t, flash_attn, f"{original.label} [{t}]") for t in cache_types]
    configs += [make_config(c.path, t, t, flash_attn, f"{c.label} [{t}]") for c in lorc_configs
                for t in lorc_cache_types]
    check_unique_labels(configs)
    return configs


def measure(session, prompt: Sequence[int], n_ctx: int, n_decode: int) -> tuple[float, float]:
    """(prefill seconds for ``n_ctx`` tokens, decode seconds for ``n_decode`` single-token calls at
    depth ``n_ctx - n_decode``)."""
    session.clear()
    tokens = list(prompt[:n_ctx])
    t0 = time.perf_counter()
    decode_tokens(session, tokens)
    t1 = time.perf_counter()
    depth = n_ctx - n_decode
    session.seq_rm(0, depth, -1)
    t2 = time.perf_counter()
    for i in range(n_decode):
        decode_tokens(session, [tokens[depth + i]], depth + i)
    t3 = time.perf_counter()
    session.clear()
    return t1 - t0, t3 - t2


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
              settings: dict[str, int] | None = None) -> dict[str, Any]:
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
        sessions = [open_session(c, n_ctx, min(n_batch, n_ctx), threads) for c in configs]
        try:
            prompts = [_prompt(s, n_ctx) for s in sessions]
            for c, s, p in zip(configs, sessions, prompts):
                if c.label not in kv:
                    kv[c.label] = measure_kv_bytes(s, p)
            times: dict[str, list[tuple[float, float]]] = {c.label: [] for c in configs}
            for r in range(repeats):
                k = r % len(configs)
                order = list(range(len(configs)))[k:] + list(range(len(configs)))[:k]
                for i in order:
                    pf, dec = measure(sessions[i], prompts[i], n_ctx, decode_tokens_n)
                    times[configs[i].label].append((pf, dec))
                    if log:
                        log(f"ctx {n_ctx} repeat {r + 1}/{repeats} {configs[i].label}: "
                            f"prefill {n_ctx / pf:.1f} tok/s, decode {decode_tokens_n / dec:.2f} tok/s")
        finally:
            for s in sessions:
                s.close()
        for c in configs:
            pf = [t[0] for t in times[c.label]]
            dec = [t[1] for t in times[c.label]]
            results.append({"config": c.label, "n_ctx": n_ctx, "prefill_tokens": n_ctx,
                            "decode_tokens": decode_tokens_n, "decode_depth": n_ctx - decode_tokens_n,
                            "prefill_s": pf, "decode_s": dec,
                            "prefill_tps": n_ctx / statistics.median(pf),
                            "decode_tps": decode_tokens_n / statistics.median(dec)})
    machine["loadavg_end"] = list(os.getloadavg())
    config_rows = []
    for c in configs:
        b = kv[c.label]
        row = {**c.describe(), "kv_bytes_per_token_raw": b.raw, "kv_bytes_per_token": b.per_token,
               "kv_ratio": b.per_token / kv[configs[0].label].per_token,
               "kv_exact_cells": b.exact_cells, "kv_exact_bytes": b.exact_bytes,
               "n_ctx_train": n_ctx_train(c.path)}
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
                         "prefill": "n_ctx-token prompt in n_batch chunks, logits for the last token only",
                         "decode": "single-token decode calls with logits at depth n_ctx - decode_tokens"},
            "configs": config_rows, "results": results,
            "elapsed_s": round(time.perf_counter() - started, 1)}


def format_bench(report: dict[str, Any]) -> str:
    contexts = report["settings"]["contexts"]
    by = {(r["config"], r["n_ctx"]): r for r in report["results"]}
    head = ["config", "cache", "KV B/tok", "ratio", "exact"] + [f"pp/tg @{c}" for c in contexts]
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
            row.append(f"{r['prefill_tps']:.0f}/{r['decode_tps']:.1f}")
        if budget is not None:
            row.append(str(c["budget_ctx"]))
        rows.append(row)
    m = report["machine"]
    s = report["settings"]
    return (_table(rows, right_from=2) +
            f"\npp = prefill tok/s, tg = decode tok/s ({s['decode_tokens']} tokens at depth n_ctx-{s['decode_tokens']}),"
            f" median of {s['repeats']}; {m['cpu']}, {s['threads']} threads, load {m['loadavg'][0]:.1f} -> "
            f"{m['loadavg_end'][0]:.1f}; exact = cells a hybrid cache keeps at full width per sequence "
            f"(sinks + window), not in KV B/tok")


# --- command line ------------------------------------------------------------------------------------

def bench_parser():
    import argparse

    ap = argparse.ArgumentParser(
        prog="bench.py",
        description="Prefill and decode tokens/s of the original model, LoRC GGUFs and quantized KV caches "
                    "at several context lengths.")
    ap.add_argument("original", nargs="?", default=SMOLLM2_ALIAS, metavar="ORIGINAL",
                    help="the original GGUF (default: smollm2, the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("lorc", nargs="*", metavar="LORC", help="LoRC GGUFs of ORIGINAL (default: convert --widths)")
    ap.add_argument("--widths", help="comma-separated kept widths to convert ORIGINAL at (progressive), e.g. "
                    "0.75,0.5,0.35 (default 0.5 when no LORC is given)")
    ap.add_argument("--cache-dir", type=Path, help="where --widths conversions are kept "
                    "(default ~/.cache/lorc-gguf/bench)")
    ap.add_argument("--reconvert", action="store_true", help="convert again even when cached")
    ap.add_argument("--ctx", help="comma-separated context lengths (default 512,2048,4096 and 8192 where "
                    "n_ctx_train allows; --quick 256,1024)")
    ap.add_argument("--repeats", type=int, help=f"repeats, median reported (default {DEFAULT_REPEATS}, --quick 1)")
    ap.add_argument("--decode-tokens", type=int, help=f"tokens decoded one by one (default {DEFAULT_DECODE_TOKENS}, "
                    "--quick 8)")
    ap.add_argument("--cache-types", default="q8_0,q4_0", help="quantized caches to run ORIGINAL with "
                    "(default q8_0,q4_0; '' for none)")
    ap.add_argument("--lorc-cache-types", default="q8_0", help="quantized latent caches to run each LoRC "
                    "model with (default q8_0; '' for none)")
    ap.add_argument("--lorc-top-k", metavar="K,...",
                    help="run every LoRC model once per value with selective reconstruction of K keys per "
                         "decoded token (lorc_top_k; 0 = all keys), e.g. 0,1024,512")
    add_settings_arguments(ap)
    ap.add_argument("--flash-attn", default="auto", choices=FLASH_ATTN_CHOICES,
                    help="flash attention for every config (default auto = on; quantized V caches need it)")
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"prefill batch (default {DEFAULT_BATCH})")
    ap.add_argument("--threads", type=int, default=default_threads(), help="CPU threads (default: all cores)")
    ap.add_argument("--budget-mib", type=float, metavar="M", help="report the largest context whose KV cache "
                    "fits M MiB for each config")
    ap.add_argument("--quick", action="store_true", help="short run: contexts 256,1024, 1 repeat, 8 decode "
                    "tokens, no q4_0 cache")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--plot", metavar="PNG", help="write a decode speed vs context plot")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    return ap


def _csv(text: str | None, kind: Callable[[str], Any], what: str) -> list[Any]:
    if text is None or not text.strip():
        return []
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise LorcError(f"bad {what} list '{text}': {e}") from e


def bench_main(argv: Sequence[str] | None = None) -> int:
    from .evaluate import _stderr, run_cli

    ap = bench_parser()
    args = ap.parse_args(argv)
    log = None if args.quiet else _stderr

    def produce() -> dict[str, Any]:
        fa = parse_flash_attn(args.flash_attn)
        original = make_config(args.original, flash_attn=fa)
        lorc = [resolve_model_path(p) for p in args.lorc]
        widths = _csv(args.widths, float, "--widths")
        if any(not 0 < w <= 1 for w in widths):
            raise LorcError(f"--widths must lie in (0, 1]: {widths}")
        if not lorc and not widths:
            widths = list(DEFAULT_WIDTHS)
        if widths:
            from .sdist import cache_dir

            lorc += convert_widths(original.path, widths, args.cache_dir or cache_dir() / "bench",
                                   args.reconvert, log)
        cache_types = _csv(args.cache_types, str, "--cache-types")
        if args.quick and args.cache_types == ap.get_default("cache_types"):
            cache_types = ["q8_0"]
        configs = build_configs(original, lorc, cache_types, _csv(args.lorc_cache_types, str, "--lorc-cache-types"), fa)
        settings = runtime_overrides(args)
        configs = expand_top_k(with_settings(configs, settings), parse_top_k(args.lorc_top_k))
        contexts = _csv(args.ctx, int, "--ctx") or default_contexts(n_ctx_train(original.path), args.quick)
        repeats = args.repeats or (1 if args.quick else DEFAULT_REPEATS)
        n_decode = args.decode_tokens or (8 if args.quick else DEFAULT_DECODE_TOKENS)
        return run_bench(configs, contexts, repeats, n_decode, args.threads, args.batch, args.budget_mib, log,
                         settings)

    def plot(report: dict[str, Any], path: str) -> None:
        from .plots import plot_speed

        plot_speed(report, path)

    return run_cli(produce, format_bench, args.json, plot, args.plot)
