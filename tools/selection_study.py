#!/usr/bin/env python3
"""How well selective reconstruction's selectors find the latent cells a decoded token attends:
the runtime's per-cell latent score against chunk landmarks (ShadowKV / xKV), chunk bounds (Quest)
and two-stage schemes, in numpy on a llama-architecture LoRC file.

    python tools/selection_study.py results/work/calibrated-progressive-0.5.gguf --text news \
        --json results/selection-study-news.json > results/selection-study-news.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf.cli.selection_study import selection_study_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(selection_study_main())
