"""The converter's cost at the sizes people run (``tools/bench_convert.py``): wall time per stage
and peak memory of ``tools/convert.py`` on a synthetic GGUF with a real model's shapes.

Memory is sampled from ``/proc/<pid>/status`` every 0.1 s while the conversion runs: ``RssAnon``
(anonymous memory: what the converter and llama.cpp allocate) is the figure that matters; the
model's memory-mapped pages (``RssFile``) are the file itself, shared with the page cache and
given back under pressure, and are reported beside it. Stage times come from the conversion
report (``seconds``). A file with fewer layers than the real model extrapolates per layer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import LorcError

REPO_ROOT = Path(__file__).resolve().parents[2]


def _status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def run_measured(cmd: list[str], interval: float = 0.1) -> dict[str, Any]:
    """Run ``cmd``; its wall time and the peaks of its anonymous and file-backed resident memory."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}

    def sample() -> None:
        while proc.poll() is None:
            for k, v in _status_kib(proc.pid).items():
                peaks[k] = max(peaks[k], v)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - started, 2),
            "peak_anon_bytes": peaks["RssAnon"] * 1024, "peak_file_bytes": peaks["RssFile"] * 1024,
            "peak_rss_bytes": peaks["VmHWM"] * 1024, "stderr_tail": stderr[-2000:], "stdout_tail": stdout[-2000:]}


RUNS = ("data-free", "runtime", "numpy")  # data-free, or calibrated with that statistics backend


def bench_convert(shape: str, workdir: Path, n_layer: int | None = None, calib_tokens: int = 4096,
                  runs: tuple[str, ...] = ("data-free", "runtime"), model: Path | None = None,
                  log=lambda msg: None) -> dict[str, Any]:
    """Each run of ``runs`` (see ``RUNS``) on ``model``, or on a synthetic GGUF of ``shape`` with
    ``n_layer`` of its layers (all by default) written once into ``workdir``."""
    for run in runs:
        if run not in RUNS:
            raise LorcError(f"unknown run {run!r}: choose from {', '.join(RUNS)}")
    workdir.mkdir(parents=True, exist_ok=True)
    if model is not None:
        if str(model) == "smollm2":
            from ..models import smollm2_path

            model = smollm2_path()
        src, dims, n_layer = Path(model), {}, None
    else:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        import synth

        dims = dict(synth.REAL_SHAPES[shape])
        n_layer = n_layer or dims["n_layer"]
        src = workdir / f"{shape}-{n_layer}l-q4_0.gguf"
        if not src.exists():
            t0 = time.perf_counter()
            synth.make_shaped_gguf(src, shape, n_layer=n_layer)
            log(f"wrote {src.name} ({src.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    from ..calibration.statistics import STATS_MEMORY_BYTES
    from ..format.read import open_gguf

    n_layer = n_layer or open_gguf(src).shape.n_layer
    full_layers = dims.get("n_layer", n_layer)
    results = []
    for run in runs:
        out = workdir / f"{src.stem}-{run}.gguf"
        flags = ["--data-free"] if run == "data-free" else ["--calib-tokens", str(calib_tokens),
                                                            "--calibration-backend", run]
        if run == "runtime" and n_layer < full_layers:
            # the statistics' memory scaled with the layers kept: the file spills (or not) as the
            # whole model would
            flags += ["--calibration-memory", f"{STATS_MEMORY_BYTES / 2**30 * n_layer / full_layers:.6g}"]
        cmd = [sys.executable, str(REPO_ROOT / "tools" / "convert.py"), str(src), str(out), "--no-progress",
               "--quiet", *flags]
        log(f"$ {' '.join(cmd[1:])}")
        m = run_measured(cmd)
        if m["returncode"] != 0:
            raise RuntimeError(f"conversion failed ({m['returncode']}):\n{m['stderr_tail']}")
        report = json.loads(Path(str(out) + ".lorc.json").read_text())
        scale = full_layers / n_layer
        row = {"run": run, "flags": flags, **{k: v for k, v in m.items() if not k.endswith("_tail")},
               "stages": report.get("seconds", {}), "layers": n_layer, "full_layers": full_layers,
               "extrapolated_seconds": round(m["seconds"] * scale, 1)}
        results.append(row)
        log(f"{run}: {m['seconds']:.0f} s, peak anon {m['peak_anon_bytes'] / 2**30:.2f} GiB; stages {row['stages']}")
        out.unlink(missing_ok=True)
    from .machine import machine_info

    return {"tool": "bench_convert", "shape": shape if model is None else None, "dims": dims, "file": src.name,
            "file_bytes": src.stat().st_size, "calib_tokens": calib_tokens, "machine": machine_info(0),
            "load_average": os.getloadavg(), "runs": results}


def format_bench_convert(result: dict[str, Any]) -> str:
    first = result["runs"][0]
    what = (f"{result['shape']} shapes, {first['layers']} of {first['full_layers']} layers, random Q4_0"
            if result["shape"] else result["file"])
    lines = [f"{what} ({result['file_bytes'] / 1e9:.2f} GB); calibration {result['calib_tokens']} tokens; "
             f"load average after the runs {', '.join(f'{x:.1f}' for x in result['load_average'])}", "",
             "| run | wall s | extrapolated to all layers, s | peak anon GiB | peak file-backed GiB | stages (s) |",
             "|---|---:|---:|---:|---:|---|"]
    for r in result["runs"]:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items())
        lines.append(f"| {r['run']} | {r['seconds']:.0f} | {r['extrapolated_seconds']:.0f} | "
                     f"{r['peak_anon_bytes'] / 2**30:.2f} | {r['peak_file_bytes'] / 2**30:.2f} | {stages} |")
    return "\n".join(lines)
