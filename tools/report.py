#!/usr/bin/env python3
"""Print a GGUF's LoRC ranks per layer, its kappa profile (from OUT.lorc.json when present) and the
KV-cache bytes per token of an f16 cache against the dense width.

    python tools/report.py OUT.gguf [--json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf.cli.describe import describe_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(describe_main())
