"""PNG plots (matplotlib, Agg backend): perplexity vs KV bytes per token from an eval JSON, LoRC
rank per layer from a GGUF, decode (and prefill) speed vs context from a bench JSON.

``tools/plot.py`` is the command line; ``tools/eval.py --plot`` and ``tools/bench.py --plot``
call the same functions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import LorcError


def _plt():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise LorcError("plots need matplotlib: pip install 'lorc-gguf[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _load(report: dict[str, Any] | str | os.PathLike[str], tool: str) -> dict[str, Any]:
    if isinstance(report, dict):
        data = report
    else:
        p = Path(report)
        if not p.is_file():
            raise LorcError(f"JSON file not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise LorcError(f"{p} is not valid JSON ({e})") from e
    if data.get("tool") != tool:
        raise LorcError(f"expected a tools/{tool}.py JSON, got tool={data.get('tool')!r}")
    return data


def _save(fig, out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    if not out.parent.is_dir():
        raise LorcError(f"the folder of {out} does not exist")
    fig.savefig(out, format="png", dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both lower is better),
    ordered by the first coordinate."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(report: dict[str, Any] | str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Perplexity against KV bytes per token, one point per model of an eval report, with its
    standard error and the Pareto front."""
    data = _load(report, "eval")
    plt = _plt()
    models = data["models"]
    xs = [m["kv_bytes_per_token"] for m in models]
    ys = [m["ppl"] for m in models]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, x, y in zip(models, xs, ys):
        marker = "s" if m.get("lorc") else ("^" if m["cache_type_v"] != "f16" or m["cache_type_k"] != "f16" else "o")
        ax.errorbar([x], [y], yerr=[m["ppl_stderr"]], fmt=marker, capsize=3, label=m["label"])
    front = pareto_front(list(zip(xs, ys)))
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "k--", lw=0.8, alpha=0.6, label="Pareto front")
    ax.set_xlabel("KV cache bytes per token (measured)")
    ax.set_ylabel(f"perplexity (ctx {data['ctx']})")
    if max(ys) / max(min(ys), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_title("Perplexity vs KV cache size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, out)


def plot_quality(report: dict[str, Any] | str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Perplexity against cache bytes (relative to the original's f16 cache), one point per row of
    a tools/quality_table.py JSON on its first held-out text: llama.cpp's caches and each LoRC
    recipe as it is read (plain latent cache, exact sinks + window, q8_0 latent cache), with the
    Pareto front over all of them."""
    data = _load(report, "quality_table")
    plt = _plt()
    rows = data["rows"]
    text = (data.get("held_out") or list(data["texts"]))[0]
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = f"llama.cpp cache ({r['cache']})" if r["config"] == "original" else f"{r['config']}, {r['read']}"
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["kv_ratio"])
        style = "^" if key.startswith("llama.cpp") else ("s-" if "exact" in key else "o--")
        ax.plot([r["kv_ratio"] for r in rs], [r["results"][text]["ppl"] for r in rs], style, label=key, ms=5, lw=0.8)
    pts = [(r["kv_ratio"], r["results"][text]["ppl"]) for r in rows]
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k:", lw=1, alpha=0.6, label="Pareto front")
    ax.set_xlabel("KV cache bytes per token, fraction of the original's f16 cache")
    ax.set_ylabel(f"perplexity on {text} (held out; ctx {data['eval']['n_ctx']}, log scale)")
    ax.set_yscale("log")
    exact = data.get("exact", {})
    ax.set_title(f"Perplexity vs KV cache size (exact rows add {exact.get('sink_tokens', 0)} + "
                 f"{exact.get('recent_window', 0)} cells per sequence)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="upper right")
    return _save(fig, out)


def plot_ranks(gguf_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """LoRC key and value rank per layer of a LoRC GGUF against the dense widths."""
    from ..format.info import lorc_ranks

    p = Path(gguf_path)
    if not p.is_file():
        raise LorcError(f"GGUF not found: {p}")
    ranks = lorc_ranks(p)
    if ranks is None:
        raise LorcError(f"{p} is not a LoRC GGUF (no lorc.version)")
    plt = _plt()
    layers = list(range(len(ranks["key_rank"])))
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.4
    ax.bar([i - w / 2 for i in layers], ranks["key_rank"], width=w, label="key rank")
    ax.bar([i + w / 2 for i in layers], ranks["value_rank"], width=w, label="value rank")
    if ranks["key_width"]:
        ax.axhline(ranks["key_width"], color="gray", ls="--", lw=0.8, label=f"dense width {ranks['key_width']}")
    kept = (sum(ranks["key_rank"]) + sum(ranks["value_rank"])) / (
        len(layers) * ((ranks["key_width"] or 1) + (ranks["value_width"] or 1)))
    ax.set_xlabel("layer")
    ax.set_ylabel("rank")
    ax.set_title(f"{p.name}: LoRC ranks (kept width {kept:.3f})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out)


def merge_bench_reports(reports: Sequence[dict[str, Any] | str | os.PathLike[str]]) -> dict[str, Any]:
    """Several tools/bench.py reports as one: configurations matched by label (the first report's
    settings and machine), results of every report; a context measured by two reports for the same
    label is refused rather than averaged away."""
    if not reports:
        raise LorcError("no bench JSON given")
    datas = [_load(r, "bench") for r in reports]
    merged = dict(datas[0])
    configs = {c["label"]: c for c in datas[0]["configs"]}
    results, seen = [], set()
    for d in datas:
        for c in d["configs"]:
            configs.setdefault(c["label"], c)
        for r in d["results"]:
            key = (r["config"], r["n_ctx"])
            if key in seen:
                raise LorcError(f"two reports measure {r['config']} at context {r['n_ctx']}: give each context once")
            seen.add(key)
            results.append(dict(r, baseline=d["configs"][0]["label"]))
    merged["configs"] = list(configs.values())
    merged["results"] = results
    merged["cpus"] = sorted({d["machine"]["cpu"] for d in datas})
    return merged


def plot_speed(report: dict[str, Any] | str | os.PathLike[str] | Sequence[dict[str, Any] | str | os.PathLike[str]],
               out: str | os.PathLike[str]) -> Path:
    """Decode and prefill tokens/s against context length, one line per configuration, from one
    tools/bench.py report or several (e.g. one run per context). Where the runs were interleaved, a
    third panel shows each configuration's paired speed against the first configuration of its run
    (decode: median over decoded tokens with the quartiles; prefill: median over repeats with the
    least and greatest), the numbers to trust on a machine whose speed drifts between runs."""
    reports = list(report) if isinstance(report, (list, tuple)) else [report]
    data = merge_bench_reports(reports)
    plt = _plt()
    paired = [r for r in data["results"] if "decode_speedup" in r]
    fig, axes = plt.subplots(1, 3 if paired else 2, figsize=(16.5 if paired else 11, 4.2))
    ax_d, ax_p = axes[0], axes[1]
    ax_r = axes[2] if paired else None
    for c in data["configs"]:
        rows = sorted((r for r in data["results"] if r["config"] == c["label"]), key=lambda r: r["n_ctx"])
        n = [r["n_ctx"] for r in rows]
        ax_d.plot(n, [r["decode_tps"] for r in rows], "o-", label=c["label"])
        ax_p.plot(n, [r["prefill_tps"] for r in rows], "o-", label=c["label"])
        # paired ratios against each run's first configuration (its own are 1 by definition)
        prs = [r for r in rows if "decode_speedup" in r and r["config"] != r["baseline"]]
        if prs:
            nr = [r["n_ctx"] for r in prs]
            dm = [r["decode_speedup"]["median"] for r in prs]
            ax_r.errorbar(nr, dm, yerr=[[m - r["decode_speedup"]["q1"] for m, r in zip(dm, prs)],
                                        [r["decode_speedup"]["q3"] - m for m, r in zip(dm, prs)]],
                          fmt="o-", capsize=3, label=f"{c['label']}: decode")
            pm = [r["prefill_speedup"]["median"] for r in prs]
            ax_r.errorbar(nr, pm, yerr=[[m - r["prefill_speedup"]["min"] for m, r in zip(pm, prs)],
                                        [r["prefill_speedup"]["max"] - m for m, r in zip(pm, prs)]],
                          fmt="s--", capsize=3, label=f"{c['label']}: prefill")
    for ax, what in ((ax_d, "decode"), (ax_p, "prefill")):
        ax.set_ylabel(f"{what} tokens/s")
    ax_d.set_title(f"decode ({data['settings']['decode_tokens']} tokens at depth n_ctx - that)")
    ax_p.set_title("prefill")
    if ax_r is not None:
        ax_r.axhline(1.0, color="gray", lw=0.8)
        ax_r.set_ylabel("speed ratio within a run")
        ax_r.set_title(f"against {' / '.join(sorted({r['baseline'] for r in paired}))}", fontsize=9)
        ax_r.legend(fontsize=7)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    ax_d.legend(fontsize=7)
    runs = f", {len(reports)} runs" if len(reports) > 1 else ""
    fig.suptitle(f"{' / '.join(data['cpus'])}, {data['settings']['threads']} threads{runs}", fontsize=9)
    return _save(fig, out)
