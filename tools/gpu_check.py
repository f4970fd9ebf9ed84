#!/usr/bin/env python3
"""LoRC on a CUDA GPU, in one run on a machine lent for a few minutes (no network, no model, at
most 64 MiB carried with the working tree).

Here, once (needs this checkout's venv and the cached pinned sdist):

    .venv/bin/python tools/gpu_check.py pack            # -> build/gpu-check/ (about 25 MB)

writes a bundle: the patched llama.cpp tree trimmed to what libllama with the CPU and CUDA backends
builds from (plus gguf-py and the patched Python bindings), the qwen2 / gemma3 test models (random
weights, 512-token synthetic vocabulary) and cp312 wheels of the pure-Python packages the checks
import (numpy and PyYAML as a fallback for a machine without them). On the lent machine
(carry build/gpu-check, nothing else; CUDA, CMake, Python 3.12):

    python3 tools/gpu_check.py run                      # -> results/gpu-check.json

1. builds libllama + ggml-cuda from the bundle (Ninja, CMAKE_CUDA_ARCHITECTURES=90 unless
   --cuda-arch; its time is in the JSON; the target is 6 minutes on 16 cores);
2. compares CUDA against the CPU backend of the same library, logits of a prompt and decode
   steps, for the cases of tests/backend_cases.py (latent cache, flash attention, q8_0 latent cache,
   exact sinks and window, prompt query blocks, top-k selection, qwen2 and gemma3 call sites), with
   the ops the scheduler left on the CPU per graph (GGML_SCHED_DEBUG=2);
3. measures decode at 8K and 32K of context (Llama-3.2-1B shapes, random Q4_0 weights, 32K-token
   synthetic vocabulary): the original with flash attention off and on, the LoRC file (width 0.5,
   data-free) as a plain latent cache off and on, with its 4 + 384 exact cells, and with k = 256.

Dry run (no GPU; what runs here): ``tools/gpu_check.py run --cpu-only --depths 256,512 --bench-layers 2``
builds the CPU-only library from the same bundle and runs every step with the CPU as the
"device" (logits then agree exactly, and no op leaves a device).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = REPO / "build" / "gpu-check"
# builds, models and the unpacked tree: beside the bundle, not in it (the bundle is what travels)
DEFAULT_WORK = REPO / "build" / "gpu-check-work"
SRC_TARBALL = "llama-lorc-src.tar.xz"
BUNDLE_LIMIT = 60 * 2**20  # of the 64 MiB that travel with the working tree
# pure-Python packages the checks import (lorc_gguf, gguf-py, the bindings) and two binary ones;
# unpacked behind the machine's own site-packages, so its numpy stays first where it has one
WHEELS = ("numpy", "pyyaml", "tqdm", "threadpoolctl", "diskcache", "jinja2", "markupsafe", "typing_extensions")
# of the patched vendor/llama.cpp, what libllama with the CPU and CUDA backends needs
KEEP = ("CMakeLists.txt", "cmake", "ggml", "src", "include", "vendor", "gguf-py", "LICENSE", "licenses")
DROP_BACKENDS = ("ggml-cann", "ggml-et", "ggml-hexagon", "ggml-hip", "ggml-metal", "ggml-musa", "ggml-opencl",
                 "ggml-openvino", "ggml-sycl", "ggml-virtgpu", "ggml-vulkan", "ggml-webgpu", "ggml-zdnn",
                 "ggml-zendnn", "ggml-rpc")
LIB_CMAKE_ARGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_COMMON=OFF",
                  "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                  "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON")
BENCH_SHAPE, BENCH_VOCAB = "llama-3.2-1b", 32000
DECODE_STEPS = 32


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


# --- here: the bundle ---------------------------------------------------------------------------

def _trim_filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = Path(info.name).parts
    if len(parts) >= 4 and parts[1:3] == ("ggml", "src") and parts[3] in DROP_BACKENDS:
        return None
    if "__pycache__" in parts:
        return None
    return info


def pack(out: Path) -> int:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from lorc_gguf.runtime import build

    import backend_cases as bc

    out.mkdir(parents=True, exist_ok=True)
    series = build.read_runtime_series()
    digest = hashlib.sha256("".join(s.digest() for s in series).encode()).hexdigest()[:16]
    with tempfile.TemporaryDirectory() as tmp:
        root = build.patched_tree(series, Path(tmp) / "sdist", log=lambda m: None)
        llama = root / "vendor" / "llama.cpp"
        with tarfile.open(out / (SRC_TARBALL + ".tmp"), "w:xz") as tar:
            for name in KEEP:
                if (llama / name).exists():
                    tar.add(llama / name, arcname=f"src/{name}", filter=_trim_filter)
            tar.add(root / "llama_cpp", arcname="py/llama_cpp",
                    filter=lambda i: None if "/lib/" in i.name + "/" and i.name.endswith(".so") or "__pycache__" in i.name
                    else i)
        os.replace(out / (SRC_TARBALL + ".tmp"), out / SRC_TARBALL)
    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:",
           "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "--no-deps", "-d", str(wheels), *WHEELS]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return fail(f"pip download of {', '.join(WHEELS)} failed: {proc.stderr.strip()[-400:]}")
    models = out / "models"
    shutil.rmtree(models, ignore_errors=True)
    bc.make_arch_originals(models)
    (out / "manifest.json").write_text(json.dumps({"series": digest, "made": time.strftime("%Y-%m-%d %H:%M:%S")}))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"bundle {out}: {size / 2**20:.1f} MiB (series {digest})")
    if size > BUNDLE_LIMIT:
        return fail(f"the bundle is {size / 2**20:.1f} MiB, above {BUNDLE_LIMIT / 2**20:.0f} MiB")
    return 0


# --- there: build ------------------------------------------------------------------------------

def unpack(bundle: Path, work: Path) -> tuple[Path, Path, Path]:
    """(source tree, bindings dir, site dir) under ``work``, unpacked once per bundle."""
    stamp = work / "unpacked"
    manifest = (bundle / "manifest.json").read_text()
    if not stamp.exists() or stamp.read_text() != manifest:
        shutil.rmtree(work / "src", ignore_errors=True)
        shutil.rmtree(work / "py", ignore_errors=True)
        shutil.rmtree(work / "site", ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        with tarfile.open(bundle / SRC_TARBALL) as tar:
            tar.extractall(work, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(work)
        for whl in sorted((bundle / "wheels").glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                z.extractall(work / "site")
        stamp.write_text(manifest)
    return work / "src", work / "py", work / "site"


def build_lib(src: Path, build_dir: Path, cuda: bool, cuda_arch: str, jobs: int, compiler_flags: str = "") -> dict:
    # the flags on the command line, not in CFLAGS: CMake reads CFLAGS only when it first configures
    # a build folder, and a folder configured once without them would keep building without them
    args = [*LIB_CMAKE_ARGS, f"-DGGML_CUDA={'ON' if cuda else 'OFF'}", f"-DCMAKE_C_FLAGS={compiler_flags}",
            f"-DCMAKE_CXX_FLAGS={compiler_flags}"]
    env = dict(os.environ)
    if cuda:
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}")
    cache = build_dir / "CMakeCache.txt"
    if cache.exists() and f"CMAKE_CACHEFILE_DIR:INTERNAL={build_dir.resolve()}" not in cache.read_text():
        shutil.rmtree(build_dir)  # configured in another folder (moved or copied): start afresh
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    t0 = time.perf_counter()

    def run(cmd: list[str], no_driver_ok: bool = False) -> bool:
        """True when it succeeds; False only for a configure that lacks libcuda.so (no_driver_ok)."""
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 and not (no_driver_ok and "CUDA::cuda_driver" in out):
            raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{out[-3000:]}")
        return proc.returncode == 0

    configure = ["cmake", "-S", str(src), "-B", str(build_dir), *gen, *args]
    if not run(configure, no_driver_ok=cuda):
        # no libcuda.so to link (a toolkit without its stubs, no driver): ggml-cuda's legacy memory pool
        args.append("-DGGML_CUDA_NO_VMM=ON")
        run([*configure, "-DGGML_CUDA_NO_VMM=ON"])
    run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", "llama"])
    return {"seconds": round(time.perf_counter() - t0, 1), "cmake_args": args, "compiler_flags": compiler_flags,
            "jobs": jobs,
            "generator": "Ninja" if gen else "default", "lib_dir": str(build_dir / "bin")}


# --- there: the checks, in a child process that loads the built library --------------------------

def bench(work: Path, depths: list[int], n_layer: int | None, on_cpu: bool, budget_s: float) -> list[dict]:
    import numpy as np

    import synth
    from lorc_gguf import convert
    from lorc_gguf.runtime.session import Session, SessionParams

    d = work / "bench"
    d.mkdir(parents=True, exist_ok=True)
    original = d / f"original-{n_layer or 'all'}.gguf"
    lorc = d / f"lorc-{n_layer or 'all'}.gguf"
    if not original.exists():
        synth.make_shaped_gguf(original, BENCH_SHAPE, n_layer=n_layer, vocab=BENCH_VOCAB)
    if not lorc.exists():
        convert(original, lorc, allocation="uniform", ratio=0.5, data_free=True, progress=False,
                sink_tokens=4, recent_window=384)
    runs = [("original", original, dict(flash_attn=False)), ("original", original, dict(flash_attn=True)),
            ("lorc plain latent", lorc, dict(flash_attn=False, lorc_sink_tokens=0, lorc_recent_window=0)),
            ("lorc plain latent", lorc, dict(flash_attn=True, lorc_sink_tokens=0, lorc_recent_window=0)),
            # the exact window's prompt in one block per ubatch (lorc_prefill_block=0), not in blocks of
            # 128 queries: the fill is not what is measured, and decode does not depend on it
            ("lorc 4 + 384 exact", lorc, dict(lorc_sink_tokens=4, lorc_recent_window=384, lorc_prefill_block=0)),
            ("lorc 4 + 384 exact, k = 256", lorc, dict(lorc_sink_tokens=4, lorc_recent_window=384, lorc_prefill_block=0,
                                                       lorc_top_k=256))]
    rng = np.random.default_rng(0)
    rows = []
    t_start = time.perf_counter()
    for depth in depths:
        tokens = [int(t) for t in rng.integers(259, BENCH_VOCAB, depth + DECODE_STEPS)]
        for name, path, settings in runs:
            placement = dict(n_gpu_layers=0, op_offload=False) if on_cpu else {}
            params = SessionParams(n_ctx=depth + DECODE_STEPS + 256, n_batch=2048, n_ubatch=2048,
                                   n_threads=os.cpu_count() or 1, **placement, **settings)
            row = dict(model=name, depth=depth, **settings)
            if time.perf_counter() - t_start > budget_s:  # the lent machine's minutes are counted
                rows.append(dict(row, skipped=f"bench budget of {budget_s:.0f} s spent"))
                continue
            try:
                with Session(path, params) as s:
                    t0 = time.perf_counter()
                    s.decode_seq(tokens[:depth], logits=False)
                    prefill = time.perf_counter() - t0
                    times = []
                    for i, t in enumerate(tokens[depth:]):
                        t0 = time.perf_counter()
                        s.decode_seq([t], pos0=depth + i)
                        times.append(time.perf_counter() - t0)
                steady = sorted(times[2:])  # the first steps allocate the decode graph
                row.update(prefill_tok_s=round(depth / prefill, 1),
                           decode_ms_median=round(1000 * steady[len(steady) // 2], 3),
                           decode_tok_s=round(1 / steady[len(steady) // 2], 1))
            except RuntimeError as e:
                row.update(error=str(e))
            rows.append(row)
            print(f"  {name:28s} depth {depth:6d} {settings}: "
                  f"{row.get('decode_tok_s', row.get('error'))} tok/s decode", file=sys.stderr, flush=True)
    base = {(r["depth"], r.get("flash_attn")): r.get("decode_tok_s") for r in rows if r["model"] == "original"}
    for r in rows:
        ref = base.get((r["depth"], r.get("flash_attn", False)))
        if ref and r.get("decode_tok_s"):
            r["decode_vs_original"] = round(r["decode_tok_s"] / ref, 3)
    return rows


def child(args) -> int:
    import llama_cpp  # noqa: F401  (LLAMA_CPP_LIB_PATH: the library just built)

    import backend_cases as bc

    work, bundle = Path(args.work), Path(args.bundle)
    devices = bc.gpu_devices(os.environ["LLAMA_CPP_LIB_PATH"])
    result: dict = {"devices": devices}
    if not args.cpu_only and not any(d.upper().startswith("CUDA") for d in devices):
        result["error"] = f"no CUDA device in the built library (devices: {devices or 'none'})"
        Path(args.child_out).write_text(json.dumps(result))
        return 1
    t0 = time.perf_counter()
    originals = {name: bundle / "models" / f"{name}.gguf" for name in bc.ARCH_ORIGINALS}
    models = bc.make_models(work / "models", originals)
    c = bc.Comparison(models, n_threads=os.cpu_count())
    result["checks"] = c.table()
    result["distinct_paths"] = c.distinct_paths()
    result["checks_ok"] = all(r["ok"] for r in result["checks"] if r["ok"] is not None)
    # ops of LoRC graphs the scheduler kept on the CPU that it runs on the GPU in the dense graph
    # (meaningless in the dry run, where the CPU is the device)
    result["new_cpu_fallbacks"] = ("n/a: the CPU is the device" if args.cpu_only else
                                   {r["case"]: r["new_cpu_ops"] for r in result["checks"] if r["new_cpu_ops"]})
    result["checks_seconds"] = round(time.perf_counter() - t0, 1)
    print(c.markdown(), file=sys.stderr, flush=True)
    Path(args.child_out).write_text(json.dumps(result, indent=1))  # kept if the bench dies
    t0 = time.perf_counter()
    result["bench"] = bench(work, args.depths, args.bench_layers, on_cpu=args.cpu_only, budget_s=args.bench_budget)
    result["bench_seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.child_out).write_text(json.dumps(result, indent=1))
    return 0


def run(args) -> int:
    bundle = Path(args.bundle)
    if not (bundle / SRC_TARBALL).is_file():
        return fail(f"no bundle at {bundle}: run `tools/gpu_check.py pack` where the sdist is, and carry {bundle}")
    work = Path(args.work)
    cuda = not args.cpu_only
    if cuda and shutil.which("nvcc") is None and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["PATH"] = f"/usr/local/cuda/bin:{os.environ['PATH']}"
    if cuda and shutil.which("nvcc") is None:
        return fail("nvcc not found (add the CUDA toolkit's bin to PATH), or --cpu-only for the dry run")
    src, py, site = unpack(bundle, work)
    # the AMX probe of tools/build_runtime.py (a VM that reports AMX but faults on it)
    sys.path[:0] = [str(src / "gguf-py"), str(REPO)]
    sys.path.append(str(site))
    from lorc_gguf.runtime.build import native_compiler_flags

    flags = native_compiler_flags(log=lambda m: print(m, file=sys.stderr))
    out: dict = {"host": platform.node(), "cpu_count": os.cpu_count(), "mode": "cpu-only dry run" if args.cpu_only else "cuda",
                 "manifest": json.loads((bundle / "manifest.json").read_text())}
    t_all = time.perf_counter()
    try:
        out["build"] = build_lib(src, work / ("build-cpu" if args.cpu_only else "build-cuda"), cuda, args.cuda_arch,
                                 args.jobs, flags)
    except RuntimeError as e:
        out["build_error"] = str(e)
        return _write(out, args.out, 1)
    print(f"built libllama in {out['build']['seconds']} s", file=sys.stderr, flush=True)
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=out["build"]["lib_dir"],
               PYTHONPATH=os.pathsep.join([str(py), str(src / "gguf-py"), str(REPO), str(REPO / "tests")]))
    child_out = work / "child.json"
    child_out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "_child", "--bundle", str(bundle), "--work", str(work), "--child-out",
           str(child_out), "--site", str(site), "--depths", ",".join(map(str, args.depths))]
    cmd += ["--cpu-only"] if args.cpu_only else []
    cmd += ["--bench-layers", str(args.bench_layers)] if args.bench_layers else []
    cmd += ["--bench-budget", str(args.bench_budget)]
    proc = subprocess.run(cmd, env=env)
    out["child_returncode"] = proc.returncode  # negative: killed by that signal (-11: a segfault)
    if child_out.exists():
        out.update(json.loads(child_out.read_text()))
    out["total_seconds"] = round(time.perf_counter() - t_all, 1)
    ok = proc.returncode == 0 and out.get("checks_ok", False)
    out["ok"] = ok
    return _write(out, args.out, 0 if ok else 1)


def _write(out: dict, path: str, rc: int) -> int:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({'ok' if rc == 0 else 'FAILED'})", file=sys.stderr)
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write the bundle (here)")
    p.add_argument("--out", type=Path, default=DEFAULT_BUNDLE)
    r = sub.add_parser("run", help="build and check (on the lent machine)")
    c = sub.add_parser("_child")
    for q in (r, c):
        q.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
        q.add_argument("--work", default=str(DEFAULT_WORK))
        q.add_argument("--cpu-only", action="store_true", help="dry run: CPU-only build, the CPU as the device")
        q.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 32768])
        q.add_argument("--bench-layers", type=int, default=None, help="keep this many layers of the bench model")
        q.add_argument("--bench-budget", type=float, default=150.0,
                       help="seconds after which the remaining bench runs are skipped (and listed as skipped)")
    r.add_argument("--out", default=str(REPO / "results" / "gpu-check.json"))
    r.add_argument("--cuda-arch", default="90", help="CMAKE_CUDA_ARCHITECTURES (90: H100/H200)")
    r.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 2)
    c.add_argument("--child-out", required=True)
    c.add_argument("--site", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        return pack(args.out)
    if args.cmd == "run":
        return run(args)
    sys.path.append(args.site)  # behind the machine's own packages
    return child(args)


if __name__ == "__main__":
    sys.exit(main())
