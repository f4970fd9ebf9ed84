#!/usr/bin/env python3
"""llama-server serving an original model and its LoRC files: aggregate decode tokens/s of parallel
slots at a long context, and a load test (answers under load against the same requests alone).

    python tools/bench_server.py smollm2 LORC.gguf --lorc-top-k 0,256 --json results/server.json

Builds llama-server from the patched tree on first use (tools/build_runtime.py --tools). Errors print
one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf.cli.bench_server import bench_server_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_server_main())
