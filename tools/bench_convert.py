#!/usr/bin/env python3
"""Wall time per stage and peak memory of tools/convert.py on a synthetic GGUF with a real model's
shapes (random Q4_0 weights, written once into --workdir).

    python tools/bench_convert.py --shape llama-3.1-8b --json results/bench-convert-8b.json
    python tools/bench_convert.py --shape llama-3.1-70b --layers 4     # extrapolated per layer
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf.cli.bench_convert import bench_convert_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_convert_main())
