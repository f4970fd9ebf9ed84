#!/usr/bin/env python3
"""Perplexity of LoRC conversions against llama.cpp's quantized KV caches on one model.

    python tools/quality_table.py                       # SmolLM2 (embedded), 8 chunks, writes quality.json
    python tools/quality_table.py --chunks 16 --json out.json --workdir /tmp/qt

Evaluation: the SECOND half of pydoc_data.topics (calibration uses the first half: disjoint),
chunks of 512 tokens with BOS first, the second half of each chunk scored (llama-perplexity's
rule), through the patched llama.cpp runtime. Rows: the original with f16, q8_0 and q4_0 caches
(flash attention for the quantized ones), and LoRC at KV widths 0.75 / 0.5 / 0.35 with data-free
SVD (uniform, progressive) and calibrated SVD (progressive, sensitivity), each with the plain
latent cache and with the hybrid cache (first 4 and last 64 positions exact: every file is
converted with those defaults and read once with the runtime settings lorc_sink_tokens = lorc_recent_window = 0),
plus the calibrated-sensitivity files with a q8_0 latent cache. Cache bytes are relative to the
original's f16 cache (q8_0 = 34/64 of f16 per element, q4_0 = 18/64); the hybrid rows hold
4 + 64 exact cells per layer on top, a constant (68/512 of a full f16 cache at ctx 512,
68/4096 at 4K). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from lorc_gguf import calibrate as cal  # noqa: E402
from lorc_gguf.convert import convert  # noqa: E402
from lorc_gguf.load import open_gguf  # noqa: E402
from lorc_gguf.models import smollm2_path  # noqa: E402
from lorc_gguf.session import Session, SessionParams, silence_llama_logs  # noqa: E402

CACHE_BYTES = {"f16": 1.0, "q8_0": 34 / 64, "q4_0": 18 / 64}  # per element, relative to f16
WIDTHS = (0.75, 0.5, 0.35)
SINK_TOKENS, RECENT_WINDOW = 4, 64


def eval_chunks(model: Path, n_chunks: int, n_ctx: int = 512) -> np.ndarray:
    tok = cal.Tokenizer(model)
    try:
        tokens = tok.tokenize(cal.evaluation_text(), add_bos=False)
        return cal.make_chunks(tokens, n_ctx, tok.bos, max_chunks=n_chunks)
    finally:
        tok.close()


def perplexity(path: Path, chunks: np.ndarray, cache: str = "f16", flash_attn: bool = False,
               exact_window: tuple[int, int] = (0, 0)) -> float:
    n_ctx = chunks.shape[1]
    params = SessionParams(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, flash_attn=flash_attn,
                           cache_type_k=cache, cache_type_v=cache,
                           lorc_sink_tokens=exact_window[0], lorc_recent_window=exact_window[1])
    nll, n = 0.0, 0
    with Session(path, params) as s:
        for c in chunks:
            s.clear()
            logits = s.decode_seq([int(t) for t in c])
            a, b = cal.chunk_nll(logits, c, n_ctx // 2)
            nll, n = nll + a, n + b
    return math.exp(nll / n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--chunks", type=int, default=8, help="evaluation chunks of 512 tokens (default 8)")
    ap.add_argument("--calib-tokens", type=int, default=cal.DEFAULT_CALIB_TOKENS)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lorc-quality"))
    ap.add_argument("--json", type=Path, default=Path("quality.json"))
    ap.add_argument("--widths", default=",".join(str(w) for w in WIDTHS))
    args = ap.parse_args(argv)
    silence_llama_logs()
    model = args.model or smollm2_path()
    args.workdir.mkdir(parents=True, exist_ok=True)
    chunks = eval_chunks(model, args.chunks)
    widths = [float(w) for w in args.widths.split(",")]

    stats_path = args.workdir / f"stats-{args.calib_tokens}.npz"
    if not stats_path.exists():
        t0 = time.perf_counter()
        stats = cal.calibrate(open_gguf(model), n_tokens=args.calib_tokens)
        cal.save_stats(stats, stats_path)
        print(f"calibration: {stats.n_tokens} tokens in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    rows: list[dict] = []

    def add(name: str, path: Path, width: float, cache: str, flash: bool, extra: dict | None = None,
            hybrid: bool = False) -> None:
        t0 = time.perf_counter()
        sizes = (SINK_TOKENS, RECENT_WINDOW) if hybrid else (0, 0)
        ppl = perplexity(path, chunks, cache, flash, sizes)
        row = {"config": name + (f", hybrid {SINK_TOKENS}+{RECENT_WINDOW}" if hybrid else ""), "kv_width": width,
               "cache": cache, "flash_attn": flash, "cache_bytes_vs_f16": width * CACHE_BYTES[cache],
               "exact_cells": SINK_TOKENS + RECENT_WINDOW if hybrid else 0, "ppl": ppl, **(extra or {})}
        rows.append(row)
        print(f"{name:<40} width {width:.3f} cache {cache:<5} bytes {row['cache_bytes_vs_f16']:.3f} "
              f"ppl {ppl:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    add("original", model, 1.0, "f16", False)
    add("original, q8_0 cache", model, 1.0, "q8_0", True)
    add("original, q4_0 cache", model, 1.0, "q4_0", True)

    configs = [
        ("data-free SVD, uniform", dict(allocation="uniform")),
        ("data-free SVD, progressive", dict(allocation="progressive")),
        ("calibrated SVD, progressive", dict(allocation="progressive", calibration=str(stats_path))),
        ("calibrated SVD, sensitivity", dict(allocation="sensitivity", calibration=str(stats_path))),
    ]
    for width in widths:
        for name, opts in configs:
            out = args.workdir / f"{name.replace(' ', '').replace(',', '-')}-{width}.gguf"
            report = convert(model, out, ratio=width, progress=False, sink_tokens=SINK_TOKENS,
                             recent_window=RECENT_WINDOW, **opts)
            kept = report["totals"]["kv_width_fraction"]
            extra = {"requested_width": width, "method": report["method"], "allocation": report["allocation"]}
            for hybrid in (False, True):
                add(name, out, kept, "f16", False, extra, hybrid)
            if name.startswith("calibrated SVD, sensitivity"):
                for hybrid in (False, True):
                    add(name + ", q8_0 latent cache", out, kept, "q8_0", True, extra, hybrid)
            out.unlink(missing_ok=True)

    base = rows[0]["ppl"]
    for r in rows:
        r["ppl_vs_original"] = r["ppl"] / base - 1.0
    result = {"tool": "quality_table", "model": str(model), "eval": {"text": "pydoc_data.topics, second half", "n_ctx": 512,
                                            "n_chunks": int(chunks.shape[0]), "scored": "second half of each chunk"},
              "calibration": {"text": "pydoc_data.topics, first half", "tokens": args.calib_tokens},
              "rows": rows}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    return 0


def format_table(result: dict) -> str:
    lines = ["| configuration | KV width | cache | bytes vs f16 | exact cells | ppl | vs original |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['kv_width']:.3f} | {r['cache']} | {r['cache_bytes_vs_f16'] * 100:.1f}% | "
                     f"{r.get('exact_cells', 0) or ''} | {r['ppl']:.3f} | {r['ppl_vs_original'] * 100:+.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
