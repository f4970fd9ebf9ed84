"""Perplexity and KL of LoRC conversions against llama.cpp's KV caches, on held-out texts.

    python tools/quality_table.py                        # SmolLM2 (embedded) -> quality.json + table
    python tools/quality_table.py --widths 0.5 --texts news --chunks 4 --json out.json

Texts: news and drama (never in the calibration text) and docs (the pydoc half disjoint from the
calibration half), chunks of 512 tokens x 8 with BOS first, second half scored; then the default
conversion at ctx 2048 x 4. Rows and recipes: lorc_gguf/evaluation/quality.py. Prints a markdown table.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .. import calibration as cal
from ..evaluation import quality
from ..models import smollm2_path
from ..runtime.library import silence_llama_logs
from .common import log_stderr


def quality_table_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--texts", default=",".join(quality.TEXTS), help="evaluation texts (default %(default)s)")
    ap.add_argument("--chunks", type=int, default=8, help="chunks of --ctx tokens per text (default 8)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    ap.add_argument("--long-ctx", type=int, default=2048, help="context of the second table (0 = none; default 2048)")
    ap.add_argument("--long-chunks", type=int, default=4, help="chunks of the second table (default 4)")
    ap.add_argument("--calib-tokens", type=int, default=cal.DEFAULT_CALIB_TOKENS)
    ap.add_argument("--widths", default=",".join(str(w) for w in quality.WIDTHS))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lorc-quality"))
    ap.add_argument("--json", type=Path, default=Path("quality.json"))
    args = ap.parse_args(argv)
    silence_llama_logs()
    result = quality.quality_table(args.model or smollm2_path(), args.workdir, texts=args.texts.split(","),
                                   widths=[float(w) for w in args.widths.split(",")], n_chunks=args.chunks,
                                   ctx=args.ctx, long_ctx=args.long_ctx, long_chunks=args.long_chunks,
                                   calib_tokens=args.calib_tokens, log=log_stderr)
    quality.write(result, args.json)
    print(quality.format_quality_table(result))
    return 0
