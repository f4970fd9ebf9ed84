"""What the converter's defaults rest on: the default conversion's quality on the held-out texts
as the calibration text changes (4K / 16K / 64K tokens of the built-in mix; all four genres, docs
alone, each genre left out) and as the exact window changes (64 ... 512, at ctx 2048).

    python tools/defaults_study.py --json results/defaults.json > results/defaults.md
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..evaluation import quality
from ..models import smollm2_path
from ..runtime.library import silence_llama_logs
from .common import log_stderr, run_cli


def defaults_study_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--width", type=float, default=0.5, help="KV width of the conversions (default 0.5)")
    ap.add_argument("--chunks", type=int, default=8, help="chunks of 512 tokens per text (default 8)")
    ap.add_argument("--texts", default=",".join(quality.STUDY_TEXTS), help="evaluation texts (default %(default)s)")
    ap.add_argument("--sizes", default=",".join(str(n) for n in quality.STUDY_SIZES))
    ap.add_argument("--mixes", default=None,
                    help="calibration mixes by name, comma-separated (default: every one of " +
                         ", ".join(name for name, _ in quality.study_mixes()) + ")")
    ap.add_argument("--backends", default="runtime",
                    help="statistics backends compared at the default size, besides the model's default")
    ap.add_argument("--windows", default=",".join(str(n) for n in quality.STUDY_WINDOWS))
    ap.add_argument("--window-ctx", type=int, default=2048)
    ap.add_argument("--window-chunks", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lorc-defaults-study"))
    ap.add_argument("--json", default="defaults.json")
    args = ap.parse_args(argv)
    silence_llama_logs()
    return run_cli(lambda: quality.defaults_study(
        args.model or smollm2_path(), args.workdir, width=args.width, texts=args.texts.split(","),
        n_chunks=args.chunks, sizes=[int(n) for n in args.sizes.split(",")],
        mixes=None if args.mixes is None else args.mixes.split(","),
        backends=[b for b in args.backends.split(",") if b], windows=[int(n) for n in args.windows.split(",")],
        window_ctx=args.window_ctx, window_chunks=args.window_chunks, log=log_stderr),
        quality.format_defaults_study, args.json)
