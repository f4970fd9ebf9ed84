"""``tools/plot.py`` (``lorc-plot``): PNG plots of lorc-gguf results."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..errors import LorcError
from ..evaluation.plots import plot_pareto, plot_quality, plot_ranks, plot_speed
from .common import fail


# subcommand: (what it plots, its input's argument name and metavar, the function drawing it)
PLOTS = {
    "ranks": ("rank per layer of a LoRC GGUF", "gguf", "GGUF", plot_ranks),
    "quality": ("perplexity vs cache bytes from a tools/quality_table.py JSON", "json", "QUALITY.json", plot_quality),
    "pareto": ("perplexity vs KV bytes per token from a tools/eval.py JSON", "json", "EVAL.json", plot_pareto),
    "speed": ("decode/prefill speed vs context from tools/bench.py JSONs (one run, or one per context)",
              "json", "BENCH.json", plot_speed),
}


def plot_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="plot.py", description="PNG plots of lorc-gguf results.")
    sub = ap.add_subparsers(dest="what", required=True)
    for what, (help_text, dest, metavar, _) in PLOTS.items():
        p = sub.add_parser(what, help=help_text)
        # speed merges several runs (e.g. one per context) into one plot
        p.add_argument(dest, metavar=metavar, nargs="+" if what == "speed" else None)
        p.add_argument("out", metavar="OUT.png")
    return ap


def plot_main(argv: Sequence[str] | None = None) -> int:
    args = plot_parser().parse_args(argv)
    _, dest, _, draw = PLOTS[args.what]
    try:
        path = draw(getattr(args, dest), args.out)
    except LorcError as e:
        return fail(str(e))
    print(path)
    return 0
