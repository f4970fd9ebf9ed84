"""Calibration: input statistics of every layer's K/V projections, measured by running the model.

``calibrate`` cuts the calibration text into chunks (``text``) and collects every layer's K/V
input statistics (``statistics``) with the numpy forward (``forward``, the reference) or through
the runtime (``runtime_stats``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import LorcError
from ..format.read import SourceModel
from .forward import Gemma3Forward, LlamaForward, numpy_forward
from .runtime_stats import collect_stats_runtime
from .statistics import CalibrationStats, LayerStats, Progress, collect_stats, load_stats, save_stats
from .text import DEFAULT_CALIB_TOKENS, DEFAULT_CTX, calibration_chunks, chat_renderer

AUTO = "auto"
BACKENDS = (AUTO, "numpy", "runtime")
# the numpy forward holds every weight as float32: up to this many bytes of them it is the default
# (the reference, and the forward every README number was calibrated with); above, the runtime
# (llama.cpp on the model's own memory-mapped weights). 4 GiB: a ~1B-parameter model, which leaves
# room for activations on an 8 GB machine. A fixed size, not free memory: the same command gives the
# same file on every machine
NUMPY_FORWARD_MAX_BYTES = 4 * 2**30


def numpy_forward_bytes(model: SourceModel) -> int:
    """Bytes of float32 weights the numpy forward would hold for ``model``."""
    return 4 * sum(int(t.n_elements) for t in model.tensors.values())


def resolve_backend(model: SourceModel, backend: str, need_queries: bool = False) -> str:
    """``backend``, with ``auto`` resolved: numpy when the model's float32 weights fit in
    ``NUMPY_FORWARD_MAX_BYTES`` or query statistics are needed (only the numpy forward records
    them), else runtime."""
    if backend not in BACKENDS:
        raise LorcError(f"unknown calibration backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if backend != AUTO:
        return backend
    return "numpy" if need_queries or numpy_forward_bytes(model) <= NUMPY_FORWARD_MAX_BYTES else "runtime"


def calibrate(model: SourceModel, text: str | None = None, n_tokens: int = DEFAULT_CALIB_TOKENS,
              n_ctx: int = DEFAULT_CTX, full: bool = True, progress: Progress | None = None,
              domains: Sequence[str] | None = None, backend: str = AUTO,
              spill_dir: str | Path | None = None, memory_bytes: int | None = None) -> CalibrationStats:
    """Statistics from ``text``, or from the built-in domains (see ``calibration_chunks``),
    ~``n_tokens`` tokens, collected by the numpy forward (the reference, which also records the
    query statistics that ``--out-weight`` needs) or by the runtime (``resolve_backend``; inputs
    of a model whose statistics exceed ``memory_bytes`` spill to ``spill_dir``)."""
    backend = resolve_backend(model, backend)
    chunks, meta = calibration_chunks(model, text, n_tokens, n_ctx, domains)
    if backend == "runtime":
        stats = collect_stats_runtime(model, chunks, full=full, progress=progress, spill_dir=spill_dir,
                                      memory_bytes=memory_bytes)
    else:
        stats = collect_stats(model, chunks, full=full, progress=progress)
    stats.source = "calibration"
    stats.meta = {**meta, "backend": backend}
    return stats


__all__ = ["AUTO", "BACKENDS", "DEFAULT_CALIB_TOKENS", "NUMPY_FORWARD_MAX_BYTES", "CalibrationStats", "Gemma3Forward",
           "LayerStats", "LlamaForward", "calibrate", "calibration_chunks", "chat_renderer", "collect_stats",
           "collect_stats_runtime", "load_stats", "numpy_forward", "numpy_forward_bytes", "resolve_backend",
           "save_stats"]
