#!/usr/bin/env python3
"""Perplexity of GGUF models (llama-perplexity style), KL divergence and top-1 agreement against
the first model, and KV-cache bytes per token measured from the runtime.

    python tools/eval.py smollm2 smollm2@q8_0 smollm2@q4_0 OUT.gguf --json eval.json --plot eval.png

MODEL is PATH, PATH@CACHE or PATH@CACHE_K,CACHE_V; `smollm2` is the embedded SmolLM2-135M-Instruct.
The default text is the second half of the pydoc_data.topics text (the first half is for
calibration). Errors print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf.cli.eval import eval_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(eval_main())
