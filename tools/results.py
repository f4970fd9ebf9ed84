#!/usr/bin/env python3
"""Reproduce the README's results on this machine: quality table, speed table and the plots.

    python tools/results.py                  # everything into results/ (about 1.5 hours on 2 cores)
    python tools/results.py --skip-quality   # only conversions, speed and plots
    make results                             # the same, after setting everything up

Steps (each a command of its own, printed as it runs):
 1. tools/quality_table.py  -> results/quality.json, results/quality.md (perplexity and KL on the
    held-out texts and the docs half, ctx 512 x 8, and the default files at ctx 2048 x 4)
 2. plot of (1)             -> results/quality.png
    tools/defaults_study.py -> results/defaults.json, results/defaults.md (what the converter's
    defaults rest on: calibration size, genre mix and statistics backend; exact window at ctx 2048)
    tools/bench_convert.py  -> results/bench-convert-8b.json/md (a calibrated conversion of a
    Llama-3.1-8B-shaped file: wall time per stage and peak memory), results/bench-convert-70b.json/md
    (2 layers of a 70B-shaped file, extrapolated per layer) and results/bench-convert-smollm2.json/md
    (the two statistics backends on the embedded model)
 3. conversions of the embedded SmolLM2 with the calibration statistics of (1):
      lorc-0.5.gguf     the converter's defaults at KV width 0.5 (the demo's file)
      lorc-vfast.gguf   the decode-speed preset: keys dense, values at 0.25 (width 0.625)
      lorc-0.5-fast.gguf  the first with a 512-token exact window and k = 128 selected keys as the
                        file's decoding default (--recent-window 512 --decode-top-k 128)
    and the rank plot of the first -> results/ranks.png
 4. tools/bench.py          -> results/bench.json, results/speed.png (original and both files, flash
    attention off for all: see the comment at the call), and again with the plain latent cache
    (--lorc-sink-tokens 0 --lorc-recent-window 0) -> results/bench-plain.json; in the first,
    the file with latent keys runs once per selective-reconstruction setting (--lorc-top-k)
 5. tools/eval.py at ctx 4096 x 4, last 256 tokens decoded one by one, per --lorc-top-k setting
    -> results/topk.json, results/topk.md
 6. the recent window as a decode-speed lever: the file with latent keys with a wider exact window
    (--lorc-recent-window, for each of WINDOWS) and fewer selected cells, quality as in (5)
    -> results/topk-w{W}.json/md, and speed at 4K -> results/bench-w{W}.json/md
 7. the same decode-tail evaluation at 8K (2 chunks) of lorc-0.5-fast.gguf, every key rebuilt and
    k = 256 / 128 -> results/topk-8k-w512.json/md

The backend is the installed runtime's: on a GPU machine build it with
`tools/build_runtime.py --cuda` first; bench.json records the machine and backend.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorc_gguf.models import smollm2_path  # noqa: E402

TOP_K = "0,1024,512,256"  # lorc_top_k values measured (0 = every key rebuilt)
# wider exact windows (lorc_recent_window) trade bytes for rebuilt keys: measured at smaller k
WINDOWS = (256, 512)
WINDOW_TOP_K = "0,256,128"


def run(cmd: list[str], stdout: Path | None = None) -> None:
    print("$ " + " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(stdout, "w") if stdout else open("/dev/null", "w") as out:
        proc = subprocess.run([str(c) for c in cmd], stdout=out if stdout else None, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"error: step failed (exit {proc.returncode}): {' '.join(str(c) for c in cmd)}")
    print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results", help="output folder (default results/)")
    ap.add_argument("--chunks", type=int, default=8, help="evaluation chunks of 512 tokens (default 8)")
    ap.add_argument("--ctx", default="512,2048,4096", help="bench context lengths (default 512,2048,4096)")
    ap.add_argument("--repeats", type=int, default=2, help="bench repeats, median reported (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="bench threads (default: all cores)")
    ap.add_argument("--skip-quality", action="store_true", help="reuse results/quality.json and its statistics")
    ap.add_argument("--skip-studies", action="store_true", help="skip the defaults study and the converter benchmarks")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    model = smollm2_path()

    if not args.skip_quality:
        run([py, "tools/quality_table.py", "--chunks", args.chunks, "--workdir", work, "--json", out / "quality.json"],
            stdout=out / "quality.md")
    run([py, "tools/plot.py", "quality", out / "quality.json", out / "quality.png"])
    if not args.skip_studies:
        run([py, "tools/defaults_study.py", "--workdir", work / "defaults", "--texts", "news,drama",
             "--mixes", "all four,docs only,without dialogue", "--json", out / "defaults.json"],
            stdout=out / "defaults.md")
        for name, flags in (("8b", ["--shape", "llama-3.1-8b", "--runs", "data-free,runtime"]),
                            ("70b", ["--shape", "llama-3.1-70b", "--layers", "2", "--runs", "data-free,runtime"]),
                            ("smollm2", ["--model", "smollm2", "--runs", "runtime,numpy"])):
            run([py, "tools/bench_convert.py", *flags, "--calib-tokens", "4096", "--workdir", work / "bench-convert",
                 "--json", out / f"bench-convert-{name}.json"], stdout=out / f"bench-convert-{name}.md")

    stats = sorted(work.glob("stats-*.npz"))
    if not stats:
        sys.exit(f"error: no calibration statistics in {work}: run without --skip-quality first")
    common = ["--calibration", stats[-1], "--no-progress", "--quiet"]
    main_file, fast_file = work / "lorc-0.5.gguf", work / "lorc-vfast.gguf"
    window_file = work / "lorc-0.5-fast.gguf"
    run([py, "tools/convert.py", model, main_file, "--ratio", "0.5", *common])
    run([py, "tools/convert.py", model, fast_file, "--values-only", "--ratio", "0.25", *common])
    run([py, "tools/convert.py", model, window_file, "--ratio", "0.5", "--recent-window", "512",
         "--decode-top-k", "128", *common])
    run([py, "tools/plot.py", "ranks", main_file, out / "ranks.png"])

    # flash attention off for every configuration: llama.cpp's CPU flash-attention kernel with an
    # f16 cache is slow at long context on some CPUs, and hybrid layers never use it, so mixing
    # the two would measure the kernel rather than the cache (quantized caches need it: not here)
    bench_opts = ["--repeats", args.repeats, "--decode-tokens", "16", "--flash-attn", "off",
                  "--cache-types", "", "--lorc-cache-types", ""]
    if args.threads:
        bench_opts += ["--threads", args.threads]
    bench = [py, "tools/bench.py", model, main_file, fast_file, "--ctx", args.ctx, *bench_opts]
    # selective reconstruction (lorc_top_k) runs as extra rows of the file with latent keys
    run([*bench, "--lorc-top-k", TOP_K, "--json", out / "bench.json", "--plot", out / "speed.png"],
        stdout=out / "bench.md")
    # the same files with the plain latent cache (0/0 settings): what the exact window costs in speed
    run([*bench, "--lorc-sink-tokens", "0", "--lorc-recent-window", "0", "--json", out / "bench-plain.json"],
        stdout=out / "bench-plain.md")
    # what selective reconstruction costs in quality: it acts on single-token decoding only, so the
    # last 256 tokens of each 4K chunk are decoded one at a time and only they are scored
    run([py, "tools/eval.py", model, main_file, "--text", "news", "--ctx", "4096", "--chunks", "4", "--decode-tail", "256",
         "--flash-attn", "off", "--lorc-top-k", TOP_K, "--quiet", "--json", out / "topk.json"], stdout=out / "topk.md")
    # the exact window as a speed lever: cells in it are never rebuilt, so a wider window lets a
    # smaller k keep quality; each window is a run-time setting in place of the file's 64
    for window in WINDOWS:
        w = ["--lorc-recent-window", str(window)]
        run([py, "tools/eval.py", model, main_file, "--text", "news", "--ctx", "4096", "--chunks", "4", "--decode-tail", "256", *w,
             "--flash-attn", "off", "--lorc-top-k", WINDOW_TOP_K, "--quiet", "--json", out / f"topk-w{window}.json"],
            stdout=out / f"topk-w{window}.md")
        run([py, "tools/bench.py", model, main_file, "--ctx", "4096", *bench_opts, *w, "--lorc-top-k", WINDOW_TOP_K,
             "--json", out / f"bench-w{window}.json"], stdout=out / f"bench-w{window}.md")
    # whether k still keeps quality at twice the context (SmolLM2's training length); --lorc-top-k
    # overrides the fast file's own k = 128 for the other rows
    run([py, "tools/eval.py", model, window_file, "--text", "news", "--ctx", "8192", "--chunks", "2", "--decode-tail", "256",
         "--flash-attn", "off", "--lorc-top-k", WINDOW_TOP_K, "--quiet", "--json", out / "topk-8k-w512.json"],
        stdout=out / "topk-8k-w512.md")
    print(f"results in {out}: quality.md/json/png, bench.md/json, bench-plain.md/json, topk.md/json, "
          "topk-w*.md/json, bench-w*.md/json, topk-8k-w512.md/json, speed.png, ranks.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
