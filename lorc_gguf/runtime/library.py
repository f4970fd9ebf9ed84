"""The llama-cpp-python module, imported on first use, and its log output."""

from __future__ import annotations

import ctypes


def llama_cpp():
    import llama_cpp

    return llama_cpp


_LOG_CALLBACK = None


def silence_llama_logs() -> None:
    """Route llama.cpp's log lines to nowhere (errors still surface as return codes)."""
    global _LOG_CALLBACK
    lib = llama_cpp()
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = lib.llama_log_callback(lambda level, text, user_data: None)
        lib.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def free_context(lib, batch, ctx, model) -> None:
    """Free what a context over a model allocated: its batch, the context, the model."""
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)
