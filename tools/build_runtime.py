#!/usr/bin/env python3
"""Build and install the LoRC-patched llama-cpp-python into the active environment.

    python tools/build_runtime.py               # CPU build, cached
    python tools/build_runtime.py --cuda        # -DGGML_CUDA=ON
    python tools/build_runtime.py --cuda --cuda-arch 90 --lib-dir      # one GPU generation, not installed
    python tools/build_runtime.py --vulkan --lib-dir                  # Vulkan build, for LLAMA_CPP_LIB_PATH
    python tools/build_runtime.py --fetch-vulkan-headers              # Debian 13's Vulkan headers into the cache
    python tools/build_runtime.py --check       # only check that both series apply to the pin
    python tools/build_runtime.py --tools       # also build llama-perplexity, llama-bench, ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf.cli.build_runtime import build_runtime_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(build_runtime_main())
