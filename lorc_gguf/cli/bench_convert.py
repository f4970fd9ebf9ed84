"""Wall time per stage and peak memory of tools/convert.py on a synthetic GGUF with a real model's
shapes (random Q4_0 weights, written once into --workdir).

    python tools/bench_convert.py --shape llama-3.1-8b --json results/bench-convert-8b.json
    python tools/bench_convert.py --shape llama-3.1-70b --layers 4     # extrapolated per layer
    python tools/bench_convert.py --model smollm2 --runs runtime,numpy --calib-tokens 4096
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..evaluation.convert_bench import bench_convert, format_bench_convert
from .common import log_stderr, run_cli


def bench_convert_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3.1-8b", help="llama-3.1-8b, llama-3.1-70b, qwen2.5-7b-as-llama")
    ap.add_argument("--layers", type=int, default=None, help="keep this many layers (default: all)")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--model", type=Path, default=None,
                    help="a GGUF to convert instead of a synthetic one (smollm2: the embedded model)")
    ap.add_argument("--runs", default="data-free,runtime",
                    help="comma list of data-free, runtime, numpy (calibrated with that statistics backend)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lorc-bench-convert"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    return run_cli(lambda: bench_convert(args.shape, args.workdir, n_layer=args.layers,
                                         calib_tokens=args.calib_tokens, runs=tuple(args.runs.split(",")),
                                         model=args.model, log=log_stderr),
                   format_bench_convert, args.json)
