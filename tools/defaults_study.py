#!/usr/bin/env python3
"""What the converter's defaults rest on: the default conversion's quality on the held-out texts
as the calibration text changes (4K / 16K / 64K tokens of the built-in mix; all four genres, docs
alone, each genre left out) and as the exact window changes (64 ... 512, at ctx 2048).

    python tools/defaults_study.py --json results/defaults.json > results/defaults.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf.cli.defaults_study import defaults_study_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(defaults_study_main())
