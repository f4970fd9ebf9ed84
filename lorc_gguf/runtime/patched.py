"""Running LoRC GGUFs with llama-cpp-python: check that the installed library carries the
LoRC patch series, and load models with a clear message when it does not.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from ..format import keys
from ..format.info import gguf_lorc_version

BUILD_HINT = "build the patched runtime with `python tools/build_runtime.py` (or `make runtime`)"


class RuntimeNotPatched(RuntimeError):
    pass


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeNotPatched(f"llama-cpp-python is not installed: {BUILD_HINT}") from e
    return llama_cpp


def runtime_format_version() -> int:
    """The lorc.version the installed libllama reads, or 0 for an unpatched library."""
    lib = _llama_cpp().llama_cpp._lib
    try:
        fn = lib.llama_lorc_format_version
    except AttributeError:
        return 0
    fn.argtypes = []
    fn.restype = ctypes.c_uint32
    return int(fn())


def require_patched_runtime() -> int:
    version = runtime_format_version()
    if version < keys.LORC_FORMAT_VERSION:
        lib_path = os.environ.get("LLAMA_CPP_LIB_PATH") or "the installed llama_cpp package"
        raise RuntimeNotPatched(
            f"llama-cpp-python ({lib_path}) cannot run LoRC GGUFs (reads lorc.version {version}, "
            f"need {keys.LORC_FORMAT_VERSION}): {BUILD_HINT}")
    return version


def load(model_path: str | os.PathLike, **kwargs: Any):
    """``llama_cpp.Llama(model_path=...)`` that explains, instead of a missing-tensor error, when a
    LoRC GGUF meets an unpatched library."""
    if gguf_lorc_version(model_path) > 0:
        require_patched_runtime()
    kwargs.setdefault("verbose", False)
    return _llama_cpp().Llama(model_path=str(model_path), **kwargs)
