"""Running LoRC GGUFs with llama-cpp-python: check that the installed library carries the
LoRC patch series, load models with a clear message when it does not, and measure the KV cache
from the runtime itself.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

from . import constants

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
    if version < constants.LORC_FORMAT_VERSION:
        lib_path = os.environ.get("LLAMA_CPP_LIB_PATH") or "the installed llama_cpp package"
        raise RuntimeNotPatched(
            f"llama-cpp-python ({lib_path}) cannot run LoRC GGUFs (reads lorc.version {version}, "
            f"need {constants.LORC_FORMAT_VERSION}): {BUILD_HINT}")
    return version


def gguf_lorc_version(path: str | os.PathLike) -> int:
    """lorc.version of a GGUF file, 0 for an ordinary model."""
    from .load import FastGGUFReader  # the stock reader takes seconds on a 49k-token vocabulary

    reader = FastGGUFReader(str(path), "r")
    field = reader.fields.get(constants.KEY_VERSION)
    return int(field.parts[-1][0]) if field is not None else 0


def load(model_path: str | os.PathLike, **kwargs: Any):
    """``llama_cpp.Llama(model_path=...)`` that explains, instead of a missing-tensor error, when a
    LoRC GGUF meets an unpatched library."""
    if gguf_lorc_version(model_path) > 0:
        require_patched_runtime()
    kwargs.setdefault("verbose", False)
    return _llama_cpp().Llama(model_path=str(model_path), **kwargs)


def seq_state_bytes(llm, seq_id: int = 0) -> int:
    """Bytes of one sequence's state as llama.cpp serializes it (KV rows of every layer)."""
    return int(_llama_cpp().llama_state_seq_get_size(llm.ctx, seq_id))


def kv_bytes_per_token(llm, tokens: list[int], n_short: int | None = None) -> float:
    """KV cache bytes per token, measured from the runtime: the growth of the serialized sequence
    state between two prompt lengths (the difference cancels the fixed header)."""
    n_long = len(tokens)
    n_short = n_short or max(1, n_long // 2)
    if not 0 < n_short < n_long:
        raise ValueError("need at least two tokens to measure bytes per token")
    sizes = []
    for n in (n_short, n_long):
        llm.reset()  # the next eval drops every cached cell past n_tokens = 0
        llm.eval(tokens[:n])
        sizes.append(seq_state_bytes(llm))
    llm.reset()
    return (sizes[1] - sizes[0]) / (n_long - n_short)


def default_model_path() -> Path:
    from .models import smollm2_path

    return smollm2_path()
