"""``tools/report.py`` (``lorc-report``): what a GGUF's metadata says about its LoRC layout (ranks
per layer, KV bytes per token of an f16 cache, the runtime defaults), with the kappa profile of the
conversion's JSON report when it sits beside the file."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from ..errors import LorcError
from ..format.describe import describe, format_description
from .common import fail


def describe_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="report.py",
                                 description="Ranks per layer and KV-cache bytes per token (f16 cache) of a GGUF; "
                                             "the kappa profile too when OUT.lorc.json sits beside it.")
    ap.add_argument("gguf", metavar="GGUF")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = ap.parse_args(argv)
    try:
        info = describe(args.gguf)
    except LorcError as e:
        return fail(str(e))
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0
