#!/usr/bin/env python3
"""Time the patched top_k, soft_max and out_prod kernels: see lorc_gguf/cli/bench_kernels.py.

    python tools/bench_kernels.py [--lib DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf.cli.bench_kernels import bench_kernels_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_kernels_main())
