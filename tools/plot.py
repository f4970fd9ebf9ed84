#!/usr/bin/env python3
"""PNG plots of lorc-gguf results.

    python tools/plot.py ranks OUT.gguf ranks.png         # LoRC rank per layer
    python tools/plot.py pareto eval.json pareto.png      # perplexity vs KV bytes per token
    python tools/plot.py speed bench.json [more.json ...] speed.png  # speed vs context (runs merged)

Errors print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf.cli.plot import plot_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(plot_main())
