"""``tools/compare.py`` (``lorc-compare``): greedy replies of an original and a LoRC model to the
same chat prompts, with their token agreement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import LorcError
from ..evaluation.compare import compare, format_compare, read_prompts
from ..evaluation.configs import FLASH_ATTN_CHOICES, ModelConfig, default_threads, parse_flash_attn, parse_model_spec
from .common import log_stderr, run_cli


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
                       log=None if args.quiet else log_stderr)

    return run_cli(produce, format_compare, args.json)
