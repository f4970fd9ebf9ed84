#!/usr/bin/env python3
"""Greedy replies of an original and a LoRC model to the same chat prompts, printed side by side,
with their token agreement (up to the first divergence and overall).

    python tools/compare.py smollm2 OUT.gguf [--prompts FILE] [--max-tokens 64] [--json compare.json]

Errors print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf.cli.compare import compare_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(compare_main())
