"""The llama-cpp-python module, imported on first use, and its log output."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator


def llama_cpp():
    import llama_cpp

    return llama_cpp


_LOG_CALLBACK = None
_SILENCED = False
# the text lists of the llama_log_text blocks running now, innermost last
_CAPTURES: list[list[str]] = []


def silence_llama_logs() -> None:
    """Route llama.cpp's log lines to nowhere (errors still surface as return codes)."""
    global _SILENCED
    _SILENCED = True
    if not _CAPTURES:
        llama_cpp().llama_log_set(_callback(), ctypes.c_void_p(0))


def _log(level, text, user_data) -> None:
    # llama.cpp's log callback: the text goes to every capture running, else nowhere
    for pieces in _CAPTURES:
        pieces.append(text.decode("utf-8", "replace"))


def _callback():
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp().llama_log_callback(_log)
    return _LOG_CALLBACK


@contextlib.contextmanager
def llama_log_text() -> Iterator[list[str]]:
    """llama.cpp's log text while the block runs, as the pieces it logged (blocks may nest: each sees
    every piece logged inside it); afterwards its log goes where it went before (nowhere after
    ``silence_llama_logs``, else llama-cpp-python's logger). Where the log was not silenced, the
    captured text is written to stderr when the block raises."""
    lib = llama_cpp()
    pieces: list[str] = []
    _CAPTURES.append(pieces)
    lib.llama_log_set(_callback(), ctypes.c_void_p(0))
    try:
        yield pieces
    except BaseException:
        if not _SILENCED and len(_CAPTURES) == 1:
            sys.stderr.write("".join(pieces))
        raise
    finally:
        _CAPTURES.remove(pieces)
        if not _CAPTURES and not _SILENCED:
            from llama_cpp import _logger  # the logger llama-cpp-python installs on import

            lib.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def free_context(lib, batch, ctx, model) -> None:
    """Free what a context over a model allocated: its batch, the context, the model."""
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)
