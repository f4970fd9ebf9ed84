"""How well selective reconstruction's selectors find the latent cells a decoded token attends (the
runtime's per-cell score against chunk landmarks, chunk bounds and two-stage schemes): a numpy study
of a llama-architecture LoRC file, see lorc_gguf.evaluation.selection.

    python tools/selection_study.py results/work/calibrated-progressive-0.5.gguf --text news
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..evaluation import selection
from ..evaluation.configs import resolve_model_path
from ..format.info import hybrid_in_effect
from ..runtime.library import silence_llama_logs
from .common import log_stderr, run_cli


def selection_study_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lorc", help="the LoRC GGUF")
    ap.add_argument("--model", default="smollm2", help="its original GGUF (default: the embedded SmolLM2)")
    ap.add_argument("--text", default="news", help="evaluation text: a built-in domain or a UTF-8 file")
    d = selection.StudySettings()
    ap.add_argument("--ctx", type=int, default=d.n_ctx)
    ap.add_argument("--queries", type=int, default=d.queries, help="last positions taken as decoded tokens")
    ap.add_argument("--layers", default=",".join(map(str, d.layers)))
    ap.add_argument("--ks", default=",".join(map(str, d.ks)))
    ap.add_argument("--chunk", type=int, default=d.chunk)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    silence_llama_logs()

    def produce() -> dict:
        sink, window = hybrid_in_effect(args.lorc)  # the file's exact cells
        settings = selection.StudySettings(
            n_ctx=args.ctx, queries=args.queries, sink=sink, window=window,
            chunk=args.chunk, ks=tuple(int(k) for k in args.ks.split(",")),
            layers=tuple(int(i) for i in args.layers.split(",")))
        return selection.run_study(resolve_model_path(args.model), args.lorc, args.text, settings, log_stderr)

    return run_cli(produce, selection.format_study, args.json)
