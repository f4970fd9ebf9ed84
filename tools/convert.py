#!/usr/bin/env python3
"""Convert a model into a LoRC GGUF (low-rank K/V projections, latent KV cache).

    python tools/convert.py MODEL OUT.gguf --progressive --ratio 0.5
    python tools/convert.py MODEL OUT.gguf --uniform --ratio 0.25 --outtype q8_0
    python tools/convert.py MODEL OUT.gguf --ranks 192,192,160,128,...   # k0,v0,k1,v1,...
    python tools/convert.py MODEL OUT.gguf --ranks OTHER.gguf.lorc.json

MODEL is a GGUF (F32/F16/BF16 or quantized) or a Hugging Face safetensors folder. Writes OUT and
the report OUT.lorc.json. Errors print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf.cli.convert import convert_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(convert_main())
