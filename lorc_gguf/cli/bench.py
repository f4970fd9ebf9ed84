"""``tools/bench.py`` (``lorc-bench``): prefill and decode tokens/s of the original model, LoRC GGUFs
and quantized KV caches at several context lengths."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import LorcError
from ..evaluation.bench import (DEFAULT_BATCH, DEFAULT_DECODE_TOKENS, DEFAULT_REPEATS, DEFAULT_WIDTHS, build_configs,
                                convert_widths, default_contexts, format_bench, memory_report, n_ctx_train, run_bench)
from ..evaluation.configs import (FLASH_ATTN_CHOICES, SMOLLM2_ALIAS, default_threads, expand_top_k, make_config,
                                  parse_flash_attn, resolve_model_path, with_batch, with_settings)
from ..format.info import gguf_lorc_version
from .common import add_settings_arguments, log_stderr, parse_csv, parse_top_k, run_cli, runtime_overrides


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
    ap.add_argument("--lorc-cache-types", default="q8_0", help="latent cache types to run each LoRC "
                    "model with (default q8_0; '' for none)")
    ap.add_argument("--lorc-top-k", metavar="K,...",
                    help="run every LoRC model once per value with selective reconstruction of K keys per "
                         "decoded token (lorc_top_k; 0 = all keys), e.g. 0,1024,512")
    add_settings_arguments(ap)
    ap.add_argument("--flash-attn", default="auto", choices=FLASH_ATTN_CHOICES,
                    help="flash attention for every config (default auto = on); quantized V caches need it, so "
                         "with off they alone run with it on")
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"prefill batch (default {DEFAULT_BATCH})")
    ap.add_argument("--lorc-batch", type=int, metavar="N", help="prefill batch (and ubatch) of every LoRC "
                    "config (default: --batch), e.g. 1024 against the original's 512; with --interleave one must "
                    "divide the other")
    ap.add_argument("--threads", type=int, default=default_threads(), help="CPU threads (default: all cores)")
    ap.add_argument("--budget-mib", type=float, metavar="M", help="report the largest context whose KV cache "
                    "fits M MiB for each config")
    ap.add_argument("--interleave", action="store_true", help="prefill one n_batch chunk, then decode one "
                    "token, of every config in turn (each config's i-th chunk or token before any config's next), "
                    "so that a machine whose speed drifts slows every config alike (default: one config after "
                    "another)")
    ap.add_argument("--memory", action="store_true", help="only open each config's context at each length and "
                    "report what llama.cpp allocates for it: KV cache and compute buffers (no prefill or decode: "
                    "seconds, not minutes)")
    ap.add_argument("--quick", action="store_true", help="short run: contexts 256,1024, 1 repeat, 8 decode "
                    "tokens, no q4_0 cache")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--plot", metavar="PNG", help="write a decode speed vs context plot")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    return ap


def bench_main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser()
    args = ap.parse_args(argv)
    log = None if args.quiet else log_stderr

    def produce() -> dict[str, Any]:
        fa = parse_flash_attn(args.flash_attn)
        original = make_config(args.original, flash_attn=fa)
        lorc = [resolve_model_path(p) for p in args.lorc]
        widths = parse_csv(args.widths, float, "--widths")
        if any(not 0 < w <= 1 for w in widths):
            raise LorcError(f"--widths must lie in (0, 1]: {widths}")
        if not lorc and not widths:
            widths = list(DEFAULT_WIDTHS)
        if widths:
            from ..runtime.sdist import cache_dir

            lorc += convert_widths(original.path, widths, args.cache_dir or cache_dir() / "bench",
                                   args.reconvert, log)
        cache_types = parse_csv(args.cache_types, str, "--cache-types")
        if args.quick and args.cache_types == ap.get_default("cache_types"):
            cache_types = ["q8_0"]
        lorc_cache_types = parse_csv(args.lorc_cache_types, str, "--lorc-cache-types")
        configs = build_configs(original, lorc, cache_types, lorc_cache_types, fa)
        settings = runtime_overrides(args)
        configs = expand_top_k(with_settings(configs, settings), parse_top_k(args.lorc_top_k))
        if args.lorc_batch is not None and args.lorc_batch != args.batch:
            configs = [with_batch(c, args.lorc_batch) if gguf_lorc_version(c.path) > 0 else c
                       for c in configs]
        contexts = parse_csv(args.ctx, int, "--ctx") or default_contexts(n_ctx_train(original.path), args.quick)
        if args.memory:
            if args.plot:
                raise LorcError("--memory measures no speed to plot: drop --plot")
            return memory_report(configs, contexts, args.threads, args.batch, log, settings)
        repeats = args.repeats or (1 if args.quick else DEFAULT_REPEATS)
        n_decode = args.decode_tokens or (8 if args.quick else DEFAULT_DECODE_TOKENS)
        return run_bench(configs, contexts, repeats, n_decode, args.threads, args.batch, args.budget_mib, log,
                         settings, args.interleave)

    def plot(report: dict[str, Any], path: str) -> None:
        from ..evaluation.plots import plot_speed

        plot_speed(report, path)

    return run_cli(produce, format_bench, args.json, plot, args.plot)
