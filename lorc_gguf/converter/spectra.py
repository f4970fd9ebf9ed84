"""Stage 2: singular values of every K/V weight (values only; the factors come later)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ..arch import Side


def singular_values(w: np.ndarray) -> np.ndarray:
    """Descending singular values in float64 (``min(w.shape)`` of them)."""
    return np.linalg.svd(np.asarray(w, dtype=np.float64), compute_uv=False)


def condition_number(s: np.ndarray, shape: tuple[int, int]) -> float:
    """kappa = sigma_max / sigma_min, with sigma_min floored at numpy's numerical-rank tolerance.

    The floor (``sigma_max * max(shape) * eps``, the threshold of ``np.linalg.matrix_rank``) keeps
    kappa finite for an exactly rank-deficient weight, so its log can enter the cumulative sum.
    """
    if s.size == 0 or s[0] <= 0.0:
        return 1.0  # an all-zero matrix carries no signal; treat it as perfectly conditioned
    floor = s[0] * max(shape) * np.finfo(np.float64).eps
    return float(s[0] / max(s[-1], floor))


def energy_kept(s: np.ndarray, rank: int) -> float:
    """Fraction of squared Frobenius norm in the leading ``rank`` singular values."""
    total = float(np.sum(s * s))
    return 1.0 if total == 0.0 else float(np.sum(s[:rank] ** 2) / total)


def truncation_error(s: np.ndarray, rank: int) -> float:
    """Relative Frobenius error of the exact rank-``rank`` truncated SVD (Eckart-Young)."""
    return float(np.sqrt(max(0.0, 1.0 - energy_kept(s, rank))))


@dataclass(frozen=True)
class Spectra:
    """Per layer singular values of K and V, and their condition numbers."""

    key: tuple[np.ndarray, ...]
    value: tuple[np.ndarray, ...]
    key_condition: tuple[float, ...]
    value_condition: tuple[float, ...]

    def values(self, side: Side) -> tuple[np.ndarray, ...]:
        return self.key if side is Side.KEY else self.value

    def condition(self, side: Side) -> tuple[float, ...]:
        return self.key_condition if side is Side.KEY else self.value_condition


def compute_spectra(weights: Iterable[tuple[Side, int, np.ndarray]],
                    on_step: Callable[[], None] | None = None) -> Spectra:
    """Consume (side, layer, weight) one at a time and keep only the singular values."""
    found: dict[Side, dict[int, tuple[np.ndarray, float]]] = {Side.KEY: {}, Side.VALUE: {}}
    for side, layer, w in weights:
        s = singular_values(w)
        found[side][layer] = (s, condition_number(s, w.shape))
        if on_step is not None:
            on_step()
    key = [found[Side.KEY][il] for il in sorted(found[Side.KEY])]
    value = [found[Side.VALUE][il] for il in sorted(found[Side.VALUE])]
    return Spectra(key=tuple(s for s, _ in key), value=tuple(s for s, _ in value),
                   key_condition=tuple(k for _, k in key), value_condition=tuple(k for _, k in value))
