"""``tools/bench_server.py``: llama-server (built from the patched tree) serving an original model
and its LoRC files as people deploy it: aggregate decode tokens/s of parallel slots each holding a
long context, and a load test of chat requests from concurrent clients (every request answered to
its max_tokens, greedy answers against the same requests answered alone, server memory before and
after)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import LorcError
from ..evaluation import serving
from ..evaluation.configs import SMOLLM2_ALIAS, default_threads, resolve_model_path
from ..evaluation.machine import machine_info, versions
from ..evaluation.texts import read_text
from ..runtime import programs
from .common import log_stderr, parse_csv, run_cli


def bench_server_parser():
    import argparse

    ap = argparse.ArgumentParser(prog="bench_server.py", description=__doc__.split("\n\n")[0].strip("`"))
    ap.add_argument("original", nargs="?", default=SMOLLM2_ALIAS, metavar="ORIGINAL",
                    help="the original GGUF (default: smollm2, the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("lorc", nargs="+", metavar="LORC", help="LoRC GGUFs of ORIGINAL")
    ap.add_argument("--lorc-top-k", default="0", help="comma-separated run-time k for every LoRC file "
                    "(0 = every key rebuilt, -1 = the file's default; default 0)")
    ap.add_argument("--slots", type=int, default=4, help="parallel slots (llama-server -np; default 4)")
    ap.add_argument("--ctx", type=int, default=4096, help="prompt tokens per slot (default 4096; 0: load test only)")
    ap.add_argument("--predict", type=int, default=64, help="tokens each slot decodes (default 64)")
    ap.add_argument("--text", default="news", help="where the prompts come from (default news)")
    ap.add_argument("--requests", type=int, default=64, help="load test requests (0: no load test; default 64)")
    ap.add_argument("--clients", type=int, default=8, help="load test concurrent clients (default 8)")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra llama-server argument, repeatable (e.g. --server-arg=--kv-unified)")
    ap.add_argument("--json", help="write the report as JSON")
    return ap


def _prompts(server, text: str, n: int, n_slots: int) -> list[list[int]]:
    ids = server.post("/tokenize", {"content": text})["tokens"]
    if len(ids) < n * n_slots:
        raise LorcError(f"the text has {len(ids)} tokens, fewer than {n_slots} prompts of {n}")
    return [ids[i * n:(i + 1) * n] for i in range(n_slots)]


def _run(args) -> dict[str, Any]:
    bin_dir = programs.programs_dir(log=log_stderr)
    original = resolve_model_path(args.original)
    top_ks = parse_csv(args.lorc_top_k, int, "--lorc-top-k") or [0]
    configs = [("original", original, [])]
    for path in args.lorc:
        for k in top_ks:
            configs.append((f"{Path(path).name} k={'file' if k < 0 else k}", Path(path),
                            [] if k < 0 else ["--lorc-top-k", str(k)]))
    text, source = read_text(args.text)
    common = ["-t", str(args.threads), "-tb", str(args.threads), *args.server_arg]
    n_ctx = args.slots * (args.ctx + args.predict + 256)
    rows = []
    for label, path, extra in configs:
        log_stderr(f"{label}: {args.slots} slots x {args.ctx} prompt tokens + {args.predict} decoded ...")
        row: dict[str, Any] = {"label": label, "model": str(path), "server_args": extra}
        if args.ctx > 0:
            with programs.llama_server(path, [*common, *extra, "-np", str(args.slots), "-c", str(n_ctx)],
                                       bin_dir=bin_dir, timeout=600) as server:
                prompts = _prompts(server, text, args.ctx, args.slots)
                row["long_context"] = serving.slots_at_context(server, prompts, args.predict)
        if args.requests > 0:
            log_stderr(f"{label}: load test, {args.requests} requests from {args.clients} clients ...")
            requests = serving.load_requests(args.requests)
            with programs.llama_server(path, [*common, *extra, "-np", "1", "-c", "4096"], bin_dir=bin_dir) as server:
                alone = serving.answer_all(server, requests)
            with programs.llama_server(path, [*common, *extra, "-np", str(args.slots), "-c", str(1024 * args.slots)],
                                       bin_dir=bin_dir) as server:
                # memory after a first half (slots, buffers and the prompt cache warmed up) and after the second
                half = len(requests) // 2
                loaded = serving.answer_all(server, requests[:half], args.clients)
                rss0 = server.rss_bytes()
                loaded += serving.answer_all(server, requests[half:], args.clients)
                rss1 = server.rss_bytes()
            row["load"] = {
                "requests": len(requests), "clients": args.clients,
                "answered_to_max_tokens": sum(f == "length" and n == m for (_, f, n), (_, m) in zip(loaded, requests)),
                "stopped_early": sum(f == "stop" for _, f, _ in loaded),
                "differ_from_alone": sum(a[0] != b[0] for a, b in zip(loaded, alone)),
                "rss_mib_half": round(rss0 / 2**20, 1), "rss_mib_end": round(rss1 / 2**20, 1),
            }
        rows.append(row)
    if args.ctx > 0:
        base = rows[0]["long_context"]["decode_tok_s_aggregate"]
        for r in rows:
            r["long_context"]["decode_vs_original"] = round(r["long_context"]["decode_tok_s_aggregate"] / base, 3)
    return {"what": "llama-server, parallel slots", "text": source, "slots": args.slots, "ctx": args.ctx,
            "predict": args.predict, "server_args": common, "rows": rows,
            "machine": machine_info(args.threads), "versions": versions()}


def format_bench_server(report: dict[str, Any]) -> str:
    lines = [f"llama-server, {report['slots']} slots x {report['ctx']} prompt tokens, {report['predict']} decoded each "
             f"({report['text']}); server arguments {' '.join(report['server_args'])}", "",
             "| model | decode tok/s (all slots) | vs original | prefill tok/s (all slots) | load test: answered / differ from alone | server RSS MiB, half -> end |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lc = r.get("long_context")
        load = r.get("load")
        lt = (f"{load['answered_to_max_tokens'] + load['stopped_early']}/{load['requests']} / {load['differ_from_alone']}"
              if load else "")
        rss = f"{load['rss_mib_half']} -> {load['rss_mib_end']}" if load else ""
        speed = (f"{lc['decode_tok_s_aggregate']:.1f} | {lc['decode_vs_original']:.2f}x | {lc['prefill_tok_s_aggregate']:.0f}"
                 if lc else "- | - | -")
        lines.append(f"| {r['label']} | {speed} | {lt} | {rss} |")
    return "\n".join(lines)


def bench_server_main(argv: Sequence[str] | None = None) -> int:
    args = bench_server_parser().parse_args(argv)
    return run_cli(lambda: _run(args), format_bench_server, args.json)
