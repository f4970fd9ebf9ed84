"""Activation-aware factorization and the sensitivity allocation (LoRC beyond data-free SVD).

The data-free SVD minimises the weight error ||W - up.down||_F, which treats every input channel
alike. The model cares about the output error on its real inputs, E||(W - up.down) x||^2 =
||(W - up.down) L||_F^2 with L L^T = E[x x^T]. Its minimiser is the truncated SVD of W L mapped back:

    W L = U S Vt,   down = Vt_r L^-1,   up = U_r S_r                           ("svd-whiten")

With only the diagonal of E[x x^T] (llama.cpp's imatrix) L = diag(rms(x))               ("svd-diag-act").

Options on top (each measured on SmolLM2, see tools/quality_table.py):

* ``ridge``: L L^T = E[x x^T] + ridge * mean(diag) * I, so directions the calibration text never
  excites are not thrown away entirely (full whitening without it over-fits the calibration set).
* ``center``: factorize the centered covariance and put the mean's share of the error into the
  projection's bias: b = (W - up.down) E[x]. Exact in expectation; the runtime adds K/V biases
  after the up-projection (the value bias passes through attention, the key bias is added before
  RoPE like any llama key bias).
* ``out_weight``: weight the output side too. Keys: the score error q . R(k - k_hat) averaged
  over the RoPE rotations weighs each RoPE pair of rows by its queries' energy. Values: the error
  reaches the residual stream through attn_output, so each KV head's rows are weighted by
  W_o,h^T W_o,h summed over the query heads of the group (a Cholesky factor M). Then
  M W L = U S Vt, up = M^-1 U_r S_r.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..arch import SIDES, Side
from ..calibration.statistics import LayerStats
from ..errors import LorcError
from .allocate import Allocation, RankGrid, normalized_profile
from .factorize import Factors, _canonical_signs

SVD = "svd"
DIAG = "svd-diag-act"
WHITEN = "svd-whiten"
METHODS = (SVD, DIAG, WHITEN)

SENSITIVITY = "sensitivity"

DEFAULT_RIDGE = 1e-3
# first-position inputs weigh as much as all the others together when the file has no exact sink
# cells (measured on Gemma-3-270M: see README, "Sinks in the factorization")
DEFAULT_SINK_WEIGHT = 1.0
DIAG_FLOOR = 1e-6  # relative to the largest rms: a dead channel keeps a tiny, finite scale
# down = S^-1 U^T M W (no solve with L) while the smallest kept singular value is above this,
# relative to the largest: dividing by it then loses at most ~1e-10 of float64's 1e-16
DIRECT_DOWN_MIN = 1e-6


@dataclass(frozen=True)
class AwareOptions:
    method: str = WHITEN
    ridge: float = DEFAULT_RIDGE
    center: bool = False  # measured: folding the mean into a bias hurts (SmolLM2 ppl 13.7 -> 18.7)
    out_weight: bool = False
    sink_weight: float = 0.0  # see input_factor


@dataclass
class Transform:
    """What one weight's factorization is whitened with: W' = M W L, factors mapped back."""

    l: np.ndarray | None = None  # (n, n) lower-triangular, or (n,) diagonal, or None (identity)
    m: np.ndarray | None = None  # (width, width) or (width,) output weight, or None
    mean: np.ndarray | None = None  # E[x] when the bias correction is on

    def left(self, w: np.ndarray) -> np.ndarray:
        if self.m is None:
            return w
        return self.m[:, None] * w if self.m.ndim == 1 else self.m @ w

    def right(self, w: np.ndarray) -> np.ndarray:
        if self.l is None:
            return w
        return w * self.l[None, :] if self.l.ndim == 1 else w @ self.l

    def unleft(self, a: np.ndarray) -> np.ndarray:
        if self.m is None:
            return a
        return a / self.m[:, None] if self.m.ndim == 1 else np.linalg.solve(self.m, a)

    def unright(self, vt: np.ndarray) -> np.ndarray:
        """vt L^-1 (rows of vt)."""
        if self.l is None:
            return vt
        if self.l.ndim == 1:
            return vt / self.l[None, :]
        # vt L^-1 = (L^-T vt^T)^T
        return np.linalg.solve(self.l.T, vt.T).T


def input_factor(stats: LayerStats, method: str, ridge: float, center: bool,
                 sink_weight: float = 0.0) -> np.ndarray | None:
    """L of the whitening (L L^T = the input covariance + ridge; a diagonal scale for DIAG).

    ``sink_weight`` > 0 adds the calibration chunks' first-position inputs (``stats.first``) with
    that many times the total weight of all the others: where attention sinks form, the first
    cell draws most of every query's attention, so its K and V must survive the factorization
    even though it is one input in hundreds (for a cache without exact sink cells)."""
    if method == SVD:
        return None
    if method == DIAG:
        ms = stats.mean_sq - (np.square(stats.mean) if center and stats.mean is not None else 0.0)
        rms = np.sqrt(np.maximum(ms, 0.0))
        return np.maximum(rms, DIAG_FLOOR * max(float(rms.max()), 1e-30))
    if method == WHITEN:
        c = stats.covariance(centered=center)
        n = c.shape[0]
        if sink_weight > 0 and stats.first is not None and len(stats.first):
            f = np.asarray(stats.first, dtype=np.float64)
            sinks = f.T @ f / len(f)
            c += (sink_weight * float(np.trace(c)) / max(float(np.trace(sinks)), 1e-300)) * sinks
        c[np.diag_indices(n)] += ridge * float(np.trace(c)) / n + 1e-12  # in place: c is n x n float64
        return np.linalg.cholesky(c)
    raise LorcError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")


def value_output_factor(wo: np.ndarray, n_head: int, n_head_kv: int, head_dim: int) -> np.ndarray:
    """Block-diagonal M (n_head_kv*head_dim square) with M^T M = sum_h W_o,h^T W_o,h per group."""
    wo = np.asarray(wo, dtype=np.float64)
    heads = wo.reshape(wo.shape[0], n_head, head_dim)
    group = n_head // n_head_kv
    d = n_head_kv * head_dim
    m = np.zeros((d, d))
    for g in range(n_head_kv):
        a = sum(heads[:, h].T @ heads[:, h] for h in range(g * group, (g + 1) * group))
        a = a / max(float(np.trace(a)) / head_dim, 1e-30)
        a = a + 1e-6 * np.eye(head_dim)
        m[g * head_dim:(g + 1) * head_dim, g * head_dim:(g + 1) * head_dim] = np.linalg.cholesky(a).T
    return m


def key_output_factor(q_pair: np.ndarray, head_dim: int = 0, rope_neox: bool = False) -> np.ndarray:
    """Per-row weights of K from the per-pair query energy: a pair is rows (2i, 2i+1) of a head,
    or (i, i + head_dim/2) with NEOX RoPE."""
    q_pair = np.asarray(q_pair, dtype=np.float64)
    if rope_neox:
        per_head = q_pair.reshape(-1, head_dim // 2)
        e = np.concatenate([per_head, per_head], axis=1).reshape(-1)
    else:
        e = np.repeat(q_pair, 2)
    e = e / max(float(e.mean()), 1e-30)
    return np.sqrt(np.maximum(e, 1e-6))


def _centered(stats: LayerStats, opts: AwareOptions) -> bool:
    return opts.center and opts.method in (DIAG, WHITEN) and stats.mean is not None


def layer_input_factor(stats: LayerStats, opts: AwareOptions) -> np.ndarray | None:
    """The input side L of a layer's transforms (its K and V share it)."""
    return input_factor(stats, opts.method, opts.ridge, _centered(stats, opts), opts.sink_weight)


def make_transform(stats: LayerStats | None, side: Side, opts: AwareOptions, *, wo: np.ndarray | None = None,
                   n_head: int = 0, n_head_kv: int = 0, head_dim: int = 0, head_dim_k: int = 0,
                   rope_neox: bool = False, input_l: np.ndarray | None = None) -> Transform:
    """``input_l``: the layer's ``input_factor``, when already made (K and V read the same input)."""
    if stats is None or opts.method == SVD:
        return Transform()
    center = _centered(stats, opts)
    l = input_l if input_l is not None else layer_input_factor(stats, opts)
    m = None
    if opts.out_weight:
        if side is Side.KEY and stats.q_pair is not None:
            m = key_output_factor(stats.q_pair, head_dim_k, rope_neox)
        elif side is Side.VALUE and wo is not None:
            m = value_output_factor(wo, n_head, n_head_kv, head_dim)
    return Transform(l=l, m=m, mean=np.asarray(stats.mean, dtype=np.float64) if center else None)


@dataclass
class Decomposition:
    """SVD of M W L; factors of any rank come from it."""

    w: np.ndarray
    tr: Transform
    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray

    @classmethod
    def of(cls, w: np.ndarray, tr: Transform) -> Decomposition:
        w = np.asarray(w, dtype=np.float64)
        g = tr.right(tr.left(w))
        u, s, vt = np.linalg.svd(g, full_matrices=False)
        u, vt = _canonical_signs(u, vt)
        return cls(w=w, tr=tr, u=u, s=s, vt=vt)

    def factors(self, rank: int) -> Factors:
        if not 1 <= rank <= len(self.s):
            raise ValueError(f"rank {rank} outside [1, {len(self.s)}]")
        if self.tr.l is not None and self.tr.l.ndim == 2 and self.s[rank - 1] > DIRECT_DOWN_MIN * self.s[0]:
            # M W L = U S V^T gives V^T L^-1 = S^-1 U^T M W: rank x width x n multiply-adds instead
            # of solving with the n x n L (an LU of it per weight: 366 GFLOP at n = 8192)
            down = (self.u[:, :rank].T @ self.tr.left(self.w)) / self.s[:rank, None]
        else:
            down = self.tr.unright(self.vt[:rank])
        up = self.tr.unleft(self.u[:, :rank] * self.s[:rank])
        return Factors(down=np.ascontiguousarray(down), up=np.ascontiguousarray(up))

    def bias_delta(self, up: np.ndarray, down: np.ndarray) -> np.ndarray | None:
        """(W - up.down) E[x]: what the bias gains when the mean correction is on."""
        if self.tr.mean is None:
            return None
        return self.w @ self.tr.mean - up @ (down @ self.tr.mean)

    def condition(self) -> float:
        """sigma_max / sigma_min of the whitened weight (capped at 1e300 for a rank-deficient one)."""
        return float(min(self.s[0] / max(self.s[-1], 1e-300), 1e300))

    def relative_errors(self) -> np.ndarray:
        """Relative (weighted) output error for ranks 0..n: sqrt(sum_{i>=r} s_i^2 / sum s_i^2)."""
        e = np.square(self.s)
        tail = np.concatenate([np.cumsum(e[::-1])[::-1], [0.0]])
        total = tail[0] if tail[0] > 0 else 1.0
        return np.sqrt(tail / total)


def output_error(w: np.ndarray, approx: np.ndarray, stats: LayerStats, bias_delta: np.ndarray | None = None
                 ) -> float:
    """sqrt(E||(W - approx) x - bias_delta||^2 / E||W x||^2) under the recorded E[x x^T]."""
    c = stats.covariance(centered=False) if stats.second is not None else np.diag(stats.mean_sq)
    d = np.asarray(w, dtype=np.float64) - approx
    # tr(D C D^T) as a BLAS product: a three-operand einsum runs unblocked loops (minutes at 8B)
    num = float(np.sum((d @ c) * d))
    if bias_delta is not None:
        mu = stats.mean
        num += float(bias_delta @ bias_delta) - 2.0 * float(bias_delta @ (d @ mu))
    w = np.asarray(w, dtype=np.float64)
    den = float(np.sum((w @ c) * w))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


# --- the sensitivity allocation -----------------------------------------------------------------

def sensitivity(curves: dict[tuple[Side, int], np.ndarray], key_width: tuple[int, ...], value_width: tuple[int, ...],
                *, ratio: float, grid: RankGrid = RankGrid(), key_ratio: float | None = None,
                value_ratio: float | None = None, value_weight: float = 1.0,
                layer_weight: dict[tuple[Side, int], float] | None = None, method: str = SENSITIVITY) -> Allocation:
    """Greedy: from the floor rank everywhere, repeatedly give the next grid step to the (layer,
    side) whose summed squared relative output error falls most per cache element, until the
    budget is spent. ``curves[(side, layer)][r]`` is the relative error at rank r (r = 0..width).
    ``value_weight`` scales the V errors against K ones, ``layer_weight`` each (side, layer)'s
    (the calibrated progressive rule, ``progressive_weights``)."""
    import heapq

    widths = {Side.KEY: tuple(key_width), Side.VALUE: tuple(value_width)}
    n_layer = len(key_width)
    if key_ratio is None and value_ratio is None:
        groups = [((Side.KEY, Side.VALUE), ratio)]
    else:
        groups = [((Side.KEY,), key_ratio if key_ratio is not None else ratio),
                  ((Side.VALUE,), value_ratio if value_ratio is not None else ratio)]
    ranks = {side: [0] * n_layer for side in SIDES}
    for sides, budget_ratio in groups:
        budget = budget_ratio * sum(sum(widths[s]) for s in sides)
        heap: list[tuple[float, int, int, int]] = []
        used = 0
        allowed: dict[tuple[Side, int], list[int]] = {}
        pos: dict[tuple[Side, int], int] = {}

        def gain(side: Side, il: int) -> tuple[float, int] | None:
            a = allowed[(side, il)]
            i = pos[(side, il)]
            if i + 1 >= len(a):
                return None
            c = curves[(side, il)]
            wgt = (value_weight if side is Side.VALUE else 1.0) * (layer_weight or {}).get((side, il), 1.0)
            r0, r1 = a[i], a[i + 1]
            return wgt * (c[r0] ** 2 - c[r1] ** 2) / (r1 - r0), r1 - r0

        for side in sides:
            for il in range(n_layer):
                a = grid.allowed(widths[side][il])
                allowed[(side, il)] = a
                pos[(side, il)] = 0
                used += a[0]
                g = gain(side, il)
                if g is not None:
                    heapq.heappush(heap, (-g[0], SIDES.index(side), il, g[1]))
        while heap:
            neg, si, il, step = heapq.heappop(heap)
            side = SIDES[si]
            if used + step > budget + 1e-9:
                # a smaller step elsewhere may still fit
                continue
            pos[(side, il)] += 1
            used += step
            g = gain(side, il)
            if g is not None:
                heapq.heappush(heap, (-g[0], si, il, g[1]))
        for side in sides:
            for il in range(n_layer):
                ranks[side][il] = allowed[(side, il)][pos[(side, il)]]
    return Allocation(method=method, key_rank=tuple(ranks[Side.KEY]), value_rank=tuple(ranks[Side.VALUE]),
                      key_width=widths[Side.KEY], value_width=widths[Side.VALUE])


# How much more an error weighs in the first layer than in the last under the calibrated
# progressive rule: weight 1 + PROGRESSIVE_STRENGTH * n_l (measured: README, "Allocation").
PROGRESSIVE_STRENGTH = 1.0


def progressive_weights(kappa: dict[Side, Sequence[float]], strength: float = PROGRESSIVE_STRENGTH
                        ) -> dict[tuple[Side, int], float]:
    """The LoRC paper's idea inside the sensitivity allocation: an error injected at layer l is
    amplified by every layer above it, which the cumulative log condition number of the layers
    from l to the top bounds. Its normalised profile n_l (1 at the first layer, 0 at the last,
    ``allocate.normalized_profile``), computed from the condition numbers of the whitened weights
    the factorization sees, weights each layer's output error by 1 + strength * n_l."""
    return {(side, il): 1.0 + strength * float(n)
            for side, values in kappa.items() for il, n in enumerate(normalized_profile(values))}


__all__ = ["AwareOptions", "Decomposition", "Transform", "make_transform", "output_error", "sensitivity",
           "METHODS", "SVD", "DIAG", "WHITEN", "SENSITIVITY"]
