"""tools/gpu_check.py without a GPU: what its bundle keeps of the patched tree, and its errors.
The whole script's dry run (a CPU-only build from the bundle, every check with the CPU as the
device) takes ~15 minutes on 2 cores and is a command, not a test:
``tools/gpu_check.py pack && tools/gpu_check.py run --cpu-only --depths 256,512 --bench-layers 2``."""

from __future__ import annotations

import importlib.util
import tarfile

from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def _kept(name: str) -> bool:
    return gpu_check._trim_filter(tarfile.TarInfo(name)) is not None


def test_the_bundle_keeps_the_cpu_and_cuda_backends_only():
    assert _kept("src/ggml/src/ggml-cuda/fattn.cu")
    assert _kept("src/ggml/src/ggml-cpu/ggml-cpu.c")
    assert _kept("src/ggml/src/ggml.c")
    assert _kept("src/vendor/miniaudio/miniaudio.h")  # vendor/CMakeLists.txt adds it unconditionally
    for backend in ("ggml-vulkan", "ggml-metal", "ggml-sycl", "ggml-hip", "ggml-rpc"):
        assert not _kept(f"src/ggml/src/{backend}/x.cpp")
    assert not _kept("src/gguf-py/gguf/__pycache__/x.pyc")


def test_run_without_a_bundle_says_how_to_make_one(tmp_path, capsys):
    rc = gpu_check.main(["run", "--bundle", str(tmp_path / "none"), "--cpu-only"])
    assert rc == 1
    assert "tools/gpu_check.py pack" in capsys.readouterr().err
