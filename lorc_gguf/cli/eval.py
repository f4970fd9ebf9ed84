"""``tools/eval.py`` (``lorc-eval``): perplexity, KL and top-1 agreement against the first model,
and KV bytes per token, for one or more GGUFs on one or more texts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import LorcError
from ..evaluation.configs import (FLASH_ATTN_CHOICES, SMOLLM2_ALIAS, default_threads, expand_top_k, parse_flash_attn,
                                  parse_model_spec, with_settings)
from ..evaluation.perplexity import DEFAULT_CHUNKS, DEFAULT_CTX, evaluate_texts, format_eval_report
from ..evaluation.texts import DEFAULT_TEXTS, parse_texts
from .common import add_settings_arguments, log_stderr, parse_labels, parse_top_k, run_cli, runtime_overrides


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
                    help="models to evaluate (default: smollm2; gemma3 names the embedded Gemma-3-270M)")
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


def _plot_pareto(report: dict[str, Any], path: str) -> None:
    from ..evaluation.plots import plot_pareto

    plot_pareto(report, path)


def eval_main(argv: Sequence[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)

    def produce() -> dict[str, Any]:
        fa = parse_flash_attn(args.flash_attn)
        labels = parse_labels(args.labels, len(args.models))
        configs = [parse_model_spec(m, args.cache_type_k, args.cache_type_v, fa, lab)
                   for m, lab in zip(args.models, labels)]
        settings = runtime_overrides(args)
        configs = expand_top_k(with_settings(configs, settings), parse_top_k(args.lorc_top_k))
        texts = parse_texts(args.text)
        if args.plot and len(texts) > 1:
            raise LorcError("--plot draws one text: give a single --text")
        return evaluate_texts(configs, texts, ctx=args.ctx, n_chunks=args.chunks, threads=args.threads,
                              n_batch=args.batch, decode_tail=args.decode_tail,
                              log=None if args.quiet else log_stderr, settings=settings)

    return run_cli(produce, format_eval_report, args.json, _plot_pareto, args.plot)
