#!/usr/bin/env python3
"""Perplexity and KL of LoRC conversions against llama.cpp's KV caches, on held-out texts.

    python tools/quality_table.py                        # SmolLM2 (embedded) -> quality.json + table
    python tools/quality_table.py --widths 0.5 --texts news --chunks 4 --json out.json

Texts: news and drama (never in the calibration text) and docs (the pydoc half disjoint from the
calibration half), chunks of 512 tokens x 8 with BOS first, second half scored; then the default
conversion at ctx 2048 x 4. Rows and recipes: lorc_gguf/evaluation/quality.py. Prints a markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf.cli.quality_table import quality_table_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(quality_table_main())
