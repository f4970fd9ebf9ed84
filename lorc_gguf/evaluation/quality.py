"""The quality table (``tools/quality_table.py``): perplexity and KL of LoRC conversions against
llama.cpp's own KV caches on one model, on the held-out texts and the documentation half.

Rows: the original with f16, q8_0 and q4_0 caches; then, at each KV width, the conversion recipes
of ``RECIPES``, each read with the cache kinds it lists (plain latent cache = the file read with
the exact sinks and window turned off at load time; a q8_0 latent cache). Every text is scored
the same way (``perplexity.evaluate``: chunks with BOS first, second half scored); KV bytes per
token come from the runtime, relative to the original's f16 cache. A second, smaller table runs
the default conversion at a longer context.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import corpus
from .. import calibration as cal
from ..converter.pipeline import convert
from ..errors import LorcError
from ..format import keys
from ..format.read import open_gguf
from .configs import ModelConfig, make_config
from .perplexity import evaluate
from .texts import read_text

WIDTHS = (0.75, 0.5, 0.35)
TEXTS = corpus.HELD_OUT_DOMAINS + ("docs",)
# prompt tokens per llama_decode call (llama.cpp's default n_ubatch): the same for every row and context
N_BATCH = 512

PLAIN_SETTINGS = {"lorc_sink_tokens": 0, "lorc_recent_window": 0}  # the same file read as a plain latent cache
PLAIN, EXACT, EXACT_Q8 = "plain latent cache", "exact sinks + window", "exact sinks + window, q8_0 latent cache"


@dataclass(frozen=True)
class Recipe:
    name: str
    options: dict[str, Any]  # convert() options on top of the ratio (and the statistics, if calibrated)
    reads: tuple[str, ...]  # PLAIN / EXACT / EXACT_Q8
    calibrated: bool = True


_EXACT = dict(sink_tokens=keys.DEFAULT_SINK_TOKENS, recent_window=keys.DEFAULT_RECENT_WINDOW)
RECIPES = (
    Recipe("data-free SVD, uniform", dict(data_free=True, allocation="uniform", **_EXACT), (EXACT,), calibrated=False),
    Recipe("data-free SVD, progressive (the paper)", dict(data_free=True, allocation="progressive", **_EXACT),
           (PLAIN, EXACT), calibrated=False),
    Recipe("calibrated, sensitivity", dict(allocation="sensitivity"), (PLAIN, EXACT)),
    Recipe("calibrated, progressive (the default)", dict(allocation="progressive"), (PLAIN, EXACT, EXACT_Q8)),
)
DEFAULT_RECIPE = RECIPES[-1]
LONG_RECIPES = (RECIPES[2], DEFAULT_RECIPE)  # calibrated sensitivity and progressive

Log = Callable[[str], None]


def _row_config(path: Path, read: str, label: str) -> ModelConfig:
    """The file read as ``read``: with its exact cells (its own defaults), with them turned off at
    load time (the plain latent cache), or with them and a q8_0 latent cache."""
    if read == EXACT_Q8:
        return make_config(path, "q8_0", "q8_0", flash_attn=True, label=label)
    config = make_config(path, label=label)
    return replace(config, **PLAIN_SETTINGS) if read == PLAIN else config


def quality_table(model: Path, workdir: Path, texts: Sequence[str] = TEXTS, widths: Sequence[float] = WIDTHS,
                  n_chunks: int = 8, ctx: int = 512, long_ctx: int = 2048, long_chunks: int = 4,
                  calib_tokens: int = cal.DEFAULT_CALIB_TOKENS, threads: int | None = None,
                  log: Log = lambda msg: None) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    stats_path = workdir / f"stats-builtin-{calib_tokens}.npz"
    if not stats_path.exists():
        t0 = time.perf_counter()
        stats = cal.calibrate(open_gguf(model), n_tokens=calib_tokens)
        cal.save_stats(stats, stats_path)
        log(f"calibration: {stats.n_tokens} tokens of {', '.join(stats.meta['domains'])} in "
            f"{time.perf_counter() - t0:.0f} s")
    stats_meta = cal.load_stats(stats_path).meta

    original = make_config(model, label="original")
    rows: list[dict[str, Any]] = [
        {"config": "original", "width": 1.0, "cache": "f16", "config_obj": original, "plain": False},
        {"config": "original", "width": 1.0, "cache": "q8_0",
         "config_obj": make_config(model, "q8_0", "q8_0", flash_attn=True, label="original q8_0"), "plain": False},
        {"config": "original", "width": 1.0, "cache": "q4_0",
         "config_obj": make_config(model, "q4_0", "q4_0", flash_attn=True, label="original q4_0"), "plain": False},
    ]
    files: dict[tuple[str, float], Path] = {}
    for width in widths:
        for recipe in RECIPES:
            out = workdir / f"{recipe.name.split(' (')[0].replace(' ', '').replace(',', '-')}-{width}.gguf"
            t0 = time.perf_counter()
            options = dict(recipe.options)
            if recipe.calibrated:
                options["calibration"] = str(stats_path)
            convert(model, out, ratio=width, progress=False, **options)
            files[(recipe.name, width)] = out
            log(f"converted {out.name} in {time.perf_counter() - t0:.0f} s")
            for read in recipe.reads:
                label = f"{recipe.name} {width} [{read}]"
                rows.append({"config": recipe.name, "width": width, "read": read,
                             "cache": "q8_0" if read == EXACT_Q8 else "f16", "plain": read == PLAIN,
                             "config_obj": _row_config(out, read, label)})

    sources = {}
    for name in texts:
        text, sources[name] = read_text(name)
        t0 = time.perf_counter()
        # one run: the exact window is a context parameter of each row, the original first (KL baseline)
        report = evaluate([r["config_obj"] for r in rows], text, ctx=ctx, n_chunks=n_chunks, threads=threads,
                          n_batch=N_BATCH)
        base = report["models"][0]["ppl"]
        for r, m in zip(rows, report["models"]):
            r.setdefault("results", {})[name] = {"ppl": m["ppl"], "ppl_stderr": m["ppl_stderr"],
                                                "vs_original": m["ppl"] / base - 1.0, "kl": m["kl_mean"],
                                                "top1": m["top1_agreement"], "n_scored": m["n_scored"]}
            r["kv_ratio"] = m["kv_ratio"]
            r["exact_cells"] = m["kv_exact_cells"]
        log(f"{name}: {len(rows)} rows in {time.perf_counter() - t0:.0f} s")

    long_rows = []
    if long_ctx:
        # the files read with their exact cells, where a longer context leaves most cells latent:
        # the default recipe and the best allocation it is measured against
        configs = [original] + [make_config(files[(recipe.name, w)], label=f"{recipe.name} {w}")
                                for w in widths for recipe in LONG_RECIPES]
        for name in texts:
            report = evaluate(configs, read_text(name)[0], ctx=long_ctx, n_chunks=long_chunks, threads=threads,
                              n_batch=N_BATCH)
            base = report["models"][0]["ppl"]
            for i, m in enumerate(report["models"]):
                if len(long_rows) <= i:
                    long_rows.append({"config": m["label"], "kv_ratio": m["kv_ratio"], "exact_cells": m["kv_exact_cells"],
                                      "results": {}})
                long_rows[i]["results"][name] = {"ppl": m["ppl"], "vs_original": m["ppl"] / base - 1.0,
                                                 "kl": m["kl_mean"], "n_scored": m["n_scored"]}
            log(f"{name} at ctx {long_ctx}: done")

    for r in rows:
        del r["config_obj"]
    return {"tool": "quality_table", "model": str(model),
            "texts": sources, "held_out": [t for t in texts if t in corpus.HELD_OUT_DOMAINS],
            "eval": {"n_ctx": ctx, "n_chunks": n_chunks, "scored": "second half of each chunk", "n_batch": N_BATCH},
            "calibration": {"tokens": calib_tokens, "domains": stats_meta.get("domains")},
            "exact": {"sink_tokens": keys.DEFAULT_SINK_TOKENS, "recent_window": keys.DEFAULT_RECENT_WINDOW},
            "rows": rows,
            "long": {"n_ctx": long_ctx, "n_chunks": long_chunks, "rows": long_rows} if long_ctx else None}


def _cell(res: dict[str, Any], with_kl: bool) -> str:
    cell = f"{res['ppl']:.3f} ({100 * res['vs_original']:+.1f}%)"
    if with_kl and res.get("kl"):
        cell += f", KL {res['kl']:.3f}"
    return cell


def format_quality_table(result: dict[str, Any]) -> str:
    texts = list(result["texts"])
    held = set(result["held_out"])
    head = "| configuration | KV width | read as | bytes vs f16 | " + " | ".join(
        f"{t} ppl{' (held out)' if t in held else ''}" for t in texts) + " |"
    lines = [head, "|---|---:|---|---:|" + "---:|" * len(texts)]
    for r in result["rows"]:
        read = r.get("read", f"{r['cache']} cache")
        lines.append(f"| {r['config']} | {r['width']:.2f} | {read} | {100 * r['kv_ratio']:.1f}% | " +
                     " | ".join(_cell(r["results"][t], t in held) for t in texts) + " |")
    out = "\n".join(lines)
    long = result.get("long")
    if long:
        lines = [f"\nctx {long['n_ctx']} x {long['n_chunks']} chunks:\n",
                 "| configuration | " + " | ".join(texts) + " |", "|---|" + "---:|" * len(texts)]
        for r in long["rows"]:
            lines.append(f"| {r['config']} | " + " | ".join(_cell(r["results"][t], t in held) for t in texts) + " |")
        out += "\n".join(lines)
    return out


def write(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2) + "\n")


# --- the defaults study (tools/defaults_study.py): calibration size and mix, exact window -----------

STUDY_SIZES = (4096, 16384, 65536)
STUDY_TEXTS = corpus.HELD_OUT_DOMAINS
STUDY_WINDOWS = (64, 128, 256, 384, 512)


def study_mixes() -> list[tuple[str, tuple[str, ...]]]:
    """The full mix, the single-genre text of earlier releases (docs), and the mix less each genre."""
    full = corpus.CALIBRATION_DOMAINS
    return [("all four", full), ("docs only", ("docs",))] + [
        (f"without {d}", tuple(x for x in full if x != d)) for d in full]


def _scored_rows(configs: list[ModelConfig], rows: list[dict[str, Any]], texts: Sequence[str], ctx: int,
                 n_chunks: int, threads: int | None, sources: dict[str, str], log: Log) -> None:
    """``configs[0]`` is the original; ``rows[i]`` gets the scores of ``configs[i + 1]`` per text."""
    for text_name in texts:
        text, sources[text_name] = read_text(text_name)
        report = evaluate(configs, text, ctx=ctx, n_chunks=n_chunks, threads=threads, n_batch=N_BATCH)
        base = report["models"][0]["ppl"]
        for row, m in zip(rows, report["models"][1:]):
            row["results"][text_name] = {"ppl": m["ppl"], "vs_original": m["ppl"] / base - 1.0, "kl": m["kl_mean"]}
        log(f"{text_name} at ctx {ctx}: done")


def defaults_study(model: Path, workdir: Path, width: float = 0.5, texts: Sequence[str] = STUDY_TEXTS,
                   n_chunks: int = 8, ctx: int = 512, sizes: Sequence[int] = STUDY_SIZES,
                   mixes: Sequence[str] | None = None, backends: Sequence[str] = ("runtime",),
                   windows: Sequence[int] = STUDY_WINDOWS, window_ctx: int = 2048, window_chunks: int = 4,
                   threads: int | None = None, log: Log = lambda msg: None) -> dict[str, Any]:
    """(a) The default conversion at ``width`` calibrated on the full mix at each of ``sizes``
    tokens, on each mix of ``study_mixes`` (those named in ``mixes``; all by default) and through
    each statistics backend of ``backends`` at the default size, scored at ``ctx``; (b) the default
    file read with each exact window of ``windows`` (4 sinks; the lorc_recent_window context
    parameter), scored at ``window_ctx`` where most cells are latent."""
    workdir.mkdir(parents=True, exist_ok=True)
    full = corpus.CALIBRATION_DOMAINS
    default_backend = cal.resolve_backend(open_gguf(model), cal.AUTO)
    runs: list[tuple[str, int, tuple[str, ...], str]] = [("all four", n, full, default_backend) for n in sizes]
    chosen = [(name, mix) for name, mix in study_mixes() if mixes is None or name in mixes]
    if mixes is not None and len(chosen) != len(mixes):
        known = ", ".join(name for name, _ in study_mixes())
        raise LorcError(f"unknown calibration mix in {', '.join(mixes)} (choose from {known})")
    runs += [(name, cal.DEFAULT_CALIB_TOKENS, mix, default_backend) for name, mix in chosen
             if not (mix == full and cal.DEFAULT_CALIB_TOKENS in sizes)]
    runs += [(f"all four, {b} statistics", cal.DEFAULT_CALIB_TOKENS, full, b) for b in backends if b != default_backend]
    original = make_config(model, label="original")
    configs, rows, default_file = [original], [], None
    for name, n_tokens, mix, backend in runs:
        tag = f"{'-'.join(mix)}-{n_tokens}" + ("" if backend == default_backend else f"-{backend}")
        stats_path = workdir / f"stats-{tag}.npz"
        if not stats_path.exists():
            t0 = time.perf_counter()
            stats = cal.calibrate(open_gguf(model), n_tokens=n_tokens, domains=mix, backend=backend)
            cal.save_stats(stats, stats_path)
            log(f"calibrated {tag} in {time.perf_counter() - t0:.0f} s")
        out = workdir / f"default-{width}-{tag}.gguf"
        convert(model, out, ratio=width, calibration=str(stats_path), progress=False)
        if mix == full and n_tokens == cal.DEFAULT_CALIB_TOKENS and backend == default_backend:
            default_file = out
        label = f"{name}, {n_tokens} tokens"
        configs.append(make_config(out, label=label))
        rows.append({"mix": name, "domains": list(mix), "tokens": n_tokens, "backend": backend, "label": label,
                     "results": {}})
    sources: dict[str, str] = {}
    _scored_rows(configs, rows, texts, ctx, n_chunks, threads, sources, log)

    if default_file is None:
        default_file = workdir / f"default-{width}.gguf"
        convert(model, default_file, ratio=width, progress=False)
    # every window in one run per text: the exact window is a context parameter of each model
    window_rows = [{"sink_tokens": keys.DEFAULT_SINK_TOKENS, "recent_window": w, "results": {}} for w in windows]
    window_configs = [original] + [replace(make_config(default_file, label=f"W = {w}"),
                                           lorc_sink_tokens=keys.DEFAULT_SINK_TOKENS, lorc_recent_window=w)
                                   for w in windows]
    _scored_rows(window_configs, window_rows, texts, window_ctx, window_chunks, threads, sources, log)
    return {"tool": "defaults_study", "model": str(model), "width": width, "texts": sources,
            "calibration": {"eval": {"n_ctx": ctx, "n_chunks": n_chunks, "n_batch": N_BATCH}, "rows": rows},
            "window": {"eval": {"n_ctx": window_ctx, "n_chunks": window_chunks, "n_batch": N_BATCH},
                       "file": default_file.name, "rows": window_rows}}


def format_defaults_study(result: dict[str, Any]) -> str:
    texts = list(result["texts"])
    c = result["calibration"]
    lines = [f"Calibration text (default conversion at width {result['width']}, ctx {c['eval']['n_ctx']} x "
             f"{c['eval']['n_chunks']}):\n",
             "| calibration text | tokens | " + " | ".join(f"{t} ppl (vs original), KL" for t in texts) + " |",
             "|---|---:|" + "---:|" * len(texts)]
    for r in c["rows"]:
        lines.append(f"| {r['mix']} ({', '.join(r['domains'])}; {r.get('backend', 'numpy')}) | {r['tokens']} | " +
                     " | ".join(_cell(r["results"][t], True) for t in texts) + " |")
    w = result["window"]
    lines += [f"\nExact window (the same file read with 4 sinks and W recent cells, ctx {w['eval']['n_ctx']} x "
              f"{w['eval']['n_chunks']}):\n",
              "| W | " + " | ".join(f"{t} ppl (vs original), KL" for t in texts) + " |", "|---:|" + "---:|" * len(texts)]
    for r in w["rows"]:
        lines.append(f"| {r['recent_window']} | " + " | ".join(_cell(r["results"][t], True) for t in texts) + " |")
    return "\n".join(lines)
