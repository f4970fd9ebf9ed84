#!/usr/bin/env python3
"""Prefill and decode tokens/s of an original model, its LoRC conversions and quantized KV caches at
several context lengths (median of --repeats, configurations alternated in one process).

    python tools/bench.py                                # smollm2, converts width 0.5 into the cache
    python tools/bench.py smollm2 --widths 0.75,0.5,0.35 --json bench.json --plot bench.png
    python tools/bench.py ORIGINAL.gguf LORC.gguf --ctx 512,2048 --budget-mib 64
    python tools/bench.py --quick

Errors print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf.cli.bench import bench_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_main())
