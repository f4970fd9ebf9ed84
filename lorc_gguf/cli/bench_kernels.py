"""Time the patched top_k, soft_max and out_prod kernels (tests/kernels/*_perf.cpp) on this machine.

    python tools/bench_kernels.py                  # against the programs build of the patched tree
    python tools/bench_kernels.py --lib DIR        # the same programs on another build's libraries

top_k: 30 rows of 4096 and 16,384 random or rising values, k = 64, one thread, against nth_element
over every index on the same rows. soft_max: 9 heads of one row of 4480 with an f16 mask, best of 7
runs of 2000, on 1 and 2 threads. out_prod: 16,384 f16 and bf16 rows of 96 / 128 / 160 against 9
dst rows (a transposed view), best of 7 runs of 50, on 2 threads. The rest's product out of memory:
32 caches of 16,384 f16 cells (96 / 128 / 160 values) against 9 heads, out_prod of untransposed rows
against mul_mat of a transposed cache, best of 7 graphs per cache, on 2 threads. Needs a checkout
(the programs' sources are in tests/kernels/).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

from ..runtime import programs
from ..runtime.sdist import REPO_ROOT


def bench_kernels_main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", type=Path, help="run on the libggml*.so of this folder (LD_LIBRARY_PATH)")
    args = ap.parse_args(argv)
    kernels = REPO_ROOT / "tests" / "kernels"
    if not kernels.is_dir():
        ap.error(f"{kernels}: not found (run from a checkout of lorc-gguf)")
    env = dict(os.environ)
    if args.lib:
        env["LD_LIBRARY_PATH"] = str(args.lib)
    bin_dir = programs.programs_dir()  # built or found once for every program
    with tempfile.TemporaryDirectory() as tmp:
        topk = programs.ggml_program(kernels / "topk_perf.cpp", Path(tmp) / "topk_perf", bin_dir)
        soft_max = programs.ggml_program(kernels / "soft_max_perf.cpp", Path(tmp) / "soft_max_perf", bin_dir)
        out_prod = programs.ggml_program(kernels / "out_prod_perf.cpp", Path(tmp) / "out_prod_perf", bin_dir)
        rest = programs.ggml_program(kernels / "rest_product_perf.cpp", Path(tmp) / "rest_product_perf", bin_dir)
        for cmd in ([str(topk)], [str(soft_max), "1"], [str(soft_max), "2"], [str(out_prod), "2"], [str(rest), "2"]):
            proc = subprocess.run(cmd, env=env, text=True)
            if proc.returncode != 0:
                return proc.returncode
    return 0
