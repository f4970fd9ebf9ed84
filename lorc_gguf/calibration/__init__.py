"""Calibration: input statistics of every layer's K/V projections, measured by running the model.

``calibrate`` cuts the calibration text into chunks (``text``) and collects every layer's K/V
input statistics (``statistics``) with the numpy forward (``forward``, the reference) or through
the runtime (``runtime_stats``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import LorcError
from ..format.read import SourceModel
from .forward import Gemma3Forward, LlamaForward, numpy_forward
from .runtime_stats import collect_stats_runtime
from .statistics import CalibrationStats, LayerStats, Progress, collect_stats, load_stats, save_stats
from .text import DEFAULT_CALIB_TOKENS, DEFAULT_CTX, calibration_chunks, chat_renderer

BACKENDS = ("runtime", "numpy")


def calibrate(model: SourceModel, text: str | None = None, n_tokens: int = DEFAULT_CALIB_TOKENS,
              n_ctx: int = DEFAULT_CTX, full: bool = True, progress: Progress | None = None,
              domains: Sequence[str] | None = None, backend: str = "numpy") -> CalibrationStats:
    """Statistics from ``text``, or from the built-in domains (see ``calibration_chunks``),
    ~``n_tokens`` tokens, collected by the numpy forward (the reference, which also records the
    query statistics that ``--out-weight`` needs) or by the runtime."""
    if backend not in BACKENDS:
        raise LorcError(f"unknown calibration backend '{backend}' (choose from {', '.join(BACKENDS)})")
    chunks, meta = calibration_chunks(model, text, n_tokens, n_ctx, domains)
    collect = collect_stats_runtime if backend == "runtime" else collect_stats
    stats = collect(model, chunks, full=full, progress=progress)
    stats.source = "calibration"
    stats.meta = {**meta, "backend": backend}
    return stats


__all__ = ["BACKENDS", "DEFAULT_CALIB_TOKENS", "CalibrationStats", "Gemma3Forward", "LayerStats", "LlamaForward",
           "calibrate", "calibration_chunks", "chat_renderer", "collect_stats", "collect_stats_runtime", "load_stats",
           "numpy_forward", "save_stats"]
