#!/usr/bin/env python3
"""`make demo`: convert the embedded SmolLM2 to a LoRC GGUF, chat with it through the patched
llama-cpp-python, and compare its KV cache with the original model's (lorc_gguf/cli/demo.py).

    python tools/demo.py [--ratio 0.5] [--data-free] [--out out/] [--prompt "..."]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf.cli.demo import demo_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(demo_main())
