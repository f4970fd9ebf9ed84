"""Stage 3: choose every layer's K and V rank.

Rules:

* progressive (LoRC paper): kappa_l = sigma_max / sigma_min of a layer's weight; the cumulative
  condition C_l = sum_{j >= l} log kappa_j measures how much error injected at layer l can be
  amplified by the layers above it; C normalised to [0, 1] over the layers gives n_l, and
  r_l = r_min + n_l * (d_l - r_min). r_min is found by bisection so the kept width meets the ratio.
  The first layer has n = 1 and always stays dense. When the ratio is below what r_min = floor
  reaches, the ramp is extended below the floor and clamped there, so the deepest layers sit at
  the floor rank and the ramp stays linear above it.
* uniform: the same fraction of every layer's width.
* explicit: ranks given by the user, taken as they are (validated, never rounded).

Continuous ranks are then rounded to multiples of ``multiple`` inside [floor, width] (a layer at
its full width stays dense) by a largest-remainder pass that lands the total as close to the budget
as the grid allows and never inverts the order of the continuous ranks of one side.

A budget ("ratio") is the kept fraction of the summed cache width. Without per-side ratios K and V
share one budget and one ramp parameter; ``key_ratio`` / ``value_ratio`` give each side its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..arch import SIDES, Side
from ..errors import LorcError
from ..format import keys

PROGRESSIVE = "progressive"
UNIFORM = "uniform"
EXPLICIT = "explicit"
METHODS = (PROGRESSIVE, UNIFORM, EXPLICIT)

_BISECTION_STEPS = 200  # halves the bracket to far below one rank unit; deterministic


@dataclass(frozen=True)
class RankGrid:
    """The ranks an allocation rule may pick for a layer of a given width."""

    multiple: int = keys.RANK_MULTIPLE
    min_rank: int = keys.MIN_RANK

    def __post_init__(self) -> None:
        if self.multiple < 1:
            raise LorcError(f"rank multiple must be >= 1, got {self.multiple}")

    def allowed(self, width: int) -> list[int]:
        """Multiples of ``multiple`` from the first one >= ``min_rank`` below ``width``, then ``width``."""
        start = max(self.multiple, -(-self.min_rank // self.multiple) * self.multiple)
        return list(range(start, width, self.multiple)) + [width]

    def floor(self, width: int) -> int:
        return self.allowed(width)[0]


@dataclass(frozen=True)
class Allocation:
    """Ranks per layer; rank == width means the layer keeps its dense weight."""

    method: str
    key_rank: tuple[int, ...]
    value_rank: tuple[int, ...]
    key_width: tuple[int, ...]
    value_width: tuple[int, ...]

    def rank(self, side: Side, layer: int) -> int:
        return (self.key_rank if side is Side.KEY else self.value_rank)[layer]

    def width(self, side: Side, layer: int) -> int:
        return (self.key_width if side is Side.KEY else self.value_width)[layer]

    def ranks(self, side: Side) -> tuple[int, ...]:
        return self.key_rank if side is Side.KEY else self.value_rank

    def widths(self, side: Side) -> tuple[int, ...]:
        return self.key_width if side is Side.KEY else self.value_width

    def is_factorized(self, side: Side, layer: int) -> bool:
        return self.rank(side, layer) < self.width(side, layer)

    @property
    def has_latent_keys(self) -> bool:
        return any(self.is_factorized(Side.KEY, il) for il in range(self.n_layer))

    @property
    def n_layer(self) -> int:
        return len(self.key_rank)

    @property
    def kept_width(self) -> int:
        return sum(self.key_rank) + sum(self.value_rank)

    @property
    def total_width(self) -> int:
        return sum(self.key_width) + sum(self.value_width)

    @property
    def kept_fraction(self) -> float:
        return self.kept_width / self.total_width

    def side_fraction(self, side: Side) -> float:
        return sum(self.ranks(side)) / sum(self.widths(side))

    def over(self, layers: Sequence[int]) -> Allocation:
        """The same ranks on ``layers`` only (fractions of the layers a rule allocated)."""
        return Allocation(method=self.method, key_rank=on_layers(self.key_rank, layers),
                          value_rank=on_layers(self.value_rank, layers), key_width=on_layers(self.key_width, layers),
                          value_width=on_layers(self.value_width, layers))


def on_layers(values: Sequence[Any], layers: Sequence[int]) -> tuple[Any, ...]:
    """The per-layer ``values`` of ``layers``, in their order."""
    return tuple(values[il] for il in layers)


# --- ratios and budgets ------------------------------------------------------------------------

def check_ratio(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 < value <= 1.0):
        raise LorcError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def budget_groups(ratio: float, key_ratio: float | None, value_ratio: float | None
                  ) -> list[tuple[tuple[Side, ...], float]]:
    """Which sides share a budget, and its ratio."""
    check_ratio("ratio", ratio)
    if key_ratio is None and value_ratio is None:
        return [((Side.KEY, Side.VALUE), ratio)]
    k = check_ratio("key ratio", key_ratio if key_ratio is not None else ratio)
    v = check_ratio("value ratio", value_ratio if value_ratio is not None else ratio)
    return [((Side.KEY,), k), ((Side.VALUE,), v)]


# --- the progressive profile -------------------------------------------------------------------

def cumulative_log_condition(kappa: Sequence[float]) -> np.ndarray:
    """C_l = sum_{j >= l} log kappa_j (natural log), layer 0 first."""
    logs = np.log(np.asarray(kappa, dtype=np.float64))
    return np.cumsum(logs[::-1])[::-1].copy()


def normalized_profile(kappa: Sequence[float]) -> np.ndarray:
    """Cumulative condition scaled to [0, 1]; all zeros (a uniform ramp) when it is flat."""
    c = cumulative_log_condition(kappa)
    span = float(c.max() - c.min()) if c.size else 0.0
    if span <= 0.0:
        return np.zeros_like(c)
    return (c - c.min()) / span


# --- continuous ranks, bisection, rounding -----------------------------------------------------

RankCurve = Callable[[float], np.ndarray]  # parameter -> continuous ranks, nondecreasing in it


def _clamp(r: np.ndarray, widths: np.ndarray, floors: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(r, floors), widths)


def _solve(curves: Sequence[RankCurve], lo: float, hi: float, target: float) -> float:
    """Parameter t in [lo, hi] where the summed curves meet ``target`` (ends when out of reach)."""
    def total(t: float) -> float:
        return float(sum(np.sum(c(t)) for c in curves))
    if total(lo) >= target:
        return lo
    if total(hi) <= target:
        return hi
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if total(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class _Entry:
    side: Side
    layer: int
    continuous: float
    allowed: tuple[int, ...]


def round_to_budget(entries: Sequence[_Entry], target: float) -> dict[tuple[Side, int], int]:
    """Round continuous ranks onto their grids with the total closest to ``target``.

    Each entry starts at its grid value just below its continuous rank; steps up to the next grid
    value go to the largest fractional remainders first (ties: larger continuous rank, then K
    before V, then the shallower layer), and the number of steps taken is the one whose total is
    closest to ``target``. Because an entry whose continuous rank is larger never starts lower and
    never queues behind a smaller one at the same start, the order within a side is kept.
    """
    start: dict[tuple[Side, int], int] = {}
    steps: list[tuple[float, float, int, int, int]] = []  # sort key ..., step size
    for e in entries:
        below = [a for a in e.allowed if a <= e.continuous + 1e-9]
        lower = below[-1] if below else e.allowed[0]
        start[(e.side, e.layer)] = lower
        above = [a for a in e.allowed if a > lower]
        if above:
            remainder = (e.continuous - lower) / (above[0] - lower)
            steps.append((-remainder, -e.continuous, SIDES.index(e.side), e.layer, above[0] - lower))
    steps.sort()
    best_k, best_gap = 0, abs(sum(start.values()) - target)
    running = float(sum(start.values()))
    for k, step in enumerate(steps, start=1):
        running += step[-1]
        gap = abs(running - target)
        if gap < best_gap - 1e-9:
            best_k, best_gap = k, gap
    allowed = {(e.side, e.layer): e.allowed for e in entries}
    result = dict(start)
    for step in steps[:best_k]:
        key = (SIDES[step[2]], step[3])
        result[key] = next(a for a in allowed[key] if a > result[key])
    return result


def _allocate(method: str, widths: dict[Side, tuple[int, ...]], groups: list[tuple[tuple[Side, ...], float]],
              curve_for: Callable[[Side, np.ndarray, np.ndarray], RankCurve], bracket: Callable[..., tuple[float, float]],
              grid: RankGrid) -> Allocation:
    ranks: dict[Side, list[int]] = {side: [0] * len(widths[side]) for side in SIDES}
    for sides, ratio in groups:
        curves, entries = [], []
        target = ratio * sum(sum(widths[s]) for s in sides)
        per_side = {}
        for side in sides:
            w = np.asarray(widths[side], dtype=np.float64)
            floors = np.asarray([grid.floor(int(d)) for d in widths[side]], dtype=np.float64)
            per_side[side] = (w, floors)
            curves.append(curve_for(side, w, floors))
        lo, hi = bracket(sides, per_side)
        t = _solve(curves, lo, hi, target)
        for side, curve in zip(sides, curves):
            for layer, c in enumerate(curve(t)):
                entries.append(_Entry(side, layer, float(c), tuple(grid.allowed(widths[side][layer]))))
        for (side, layer), r in round_to_budget(entries, target).items():
            ranks[side][layer] = r
    return Allocation(method=method, key_rank=tuple(ranks[Side.KEY]), value_rank=tuple(ranks[Side.VALUE]),
                      key_width=tuple(widths[Side.KEY]), value_width=tuple(widths[Side.VALUE]))


def progressive(key_condition: Sequence[float], value_condition: Sequence[float],
                key_width: Sequence[int], value_width: Sequence[int], *, ratio: float,
                key_ratio: float | None = None, value_ratio: float | None = None,
                grid: RankGrid = RankGrid()) -> Allocation:
    """The paper's rule: rank grows linearly with the normalised cumulative condition number."""
    groups = budget_groups(ratio, key_ratio, value_ratio)
    profile = {Side.KEY: normalized_profile(key_condition), Side.VALUE: normalized_profile(value_condition)}
    widths = {Side.KEY: tuple(key_width), Side.VALUE: tuple(value_width)}

    def curve_for(side: Side, w: np.ndarray, floors: np.ndarray) -> RankCurve:
        n = profile[side]
        return lambda r_min: _clamp(r_min + n * (w - r_min), w, floors)

    def bracket(sides: tuple[Side, ...], per_side: dict) -> tuple[float, float]:
        # lo: the r_min at which every layer with n < 1 has reached its floor
        lo = min(float(per_side[s][1].min()) for s in sides)
        for s in sides:
            w, floors = per_side[s]
            n = profile[s]
            below = n < 1.0
            if np.any(below):
                lo = min(lo, float(np.min((floors[below] - n[below] * w[below]) / (1.0 - n[below]))))
        hi = max(float(per_side[s][0].max()) for s in sides)
        return lo, hi

    return _allocate(PROGRESSIVE, widths, groups, curve_for, bracket, grid)


def uniform(key_width: Sequence[int], value_width: Sequence[int], *, ratio: float,
            key_ratio: float | None = None, value_ratio: float | None = None,
            grid: RankGrid = RankGrid()) -> Allocation:
    """The same fraction t of every layer's width (t solved so clamping at the floor is paid for)."""
    groups = budget_groups(ratio, key_ratio, value_ratio)
    widths = {Side.KEY: tuple(key_width), Side.VALUE: tuple(value_width)}

    def curve_for(side: Side, w: np.ndarray, floors: np.ndarray) -> RankCurve:
        return lambda t: _clamp(t * w, w, floors)

    return _allocate(UNIFORM, widths, groups, curve_for, lambda sides, per_side: (0.0, 1.0), grid)


def explicit(key_rank: Sequence[int], value_rank: Sequence[int],
             key_width: Sequence[int], value_width: Sequence[int]) -> Allocation:
    n_layer = len(key_width)
    for side, ranks, widths in ((Side.KEY, key_rank, key_width), (Side.VALUE, value_rank, value_width)):
        if len(ranks) != n_layer:
            raise LorcError(f"{len(ranks)} {side.value} ranks given, the model has {n_layer} layers")
        for layer, (r, d) in enumerate(zip(ranks, widths)):
            if not isinstance(r, (int, np.integer)) or isinstance(r, bool):
                raise LorcError(f"layer {layer} {side.value} rank {r!r} is not an integer")
            if r < 1 or r > d:
                raise LorcError(f"layer {layer} {side.value} rank {r} is outside [1, {d}] (the layer's width)")
    return Allocation(method=EXPLICIT, key_rank=tuple(int(r) for r in key_rank),
                      value_rank=tuple(int(r) for r in value_rank),
                      key_width=tuple(key_width), value_width=tuple(value_width))


# --- parsing ``--ranks`` -----------------------------------------------------------------------

def parse_ranks(spec: str | Path | dict | Sequence[int], n_layer: int) -> tuple[list[int], list[int]]:
    """``k0,v0,k1,v1,...``, a JSON file {"key_rank": [...], "value_rank": [...]} (a LoRC report
    works too), such a dict, or a flat interleaved sequence; returns (key ranks, value ranks)."""
    if isinstance(spec, dict):
        return _ranks_from_dict(spec, "ranks", n_layer)
    if isinstance(spec, (str, Path)):
        text = str(spec).strip()
        if text.lower().endswith(".json") or Path(text).is_file():
            path = Path(text)
            try:
                data = json.loads(path.read_text())
            except OSError as e:
                raise LorcError(f"cannot read ranks file {path}: {e.strerror}") from None
            except json.JSONDecodeError as e:
                raise LorcError(f"ranks file {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
            if not isinstance(data, dict):
                raise LorcError(f"ranks file {path} must hold an object with key_rank and value_rank")
            return _ranks_from_dict(data, str(path), n_layer)
        try:
            flat = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise LorcError(f"--ranks expects integers k0,v0,k1,v1,... or a JSON file, got '{text}'") from None
    else:
        flat = list(spec)
    if len(flat) != 2 * n_layer:
        raise LorcError(f"--ranks has {len(flat)} numbers, expected {2 * n_layer} "
                        f"(key and value rank for each of {n_layer} layers: k0,v0,k1,v1,...)")
    return flat[0::2], flat[1::2]


def _ranks_from_dict(data: dict, origin: str, n_layer: int) -> tuple[list[int], list[int]]:
    missing = [k for k in ("key_rank", "value_rank") if not isinstance(data.get(k), list)]
    if missing:
        raise LorcError(f"{origin}: needs lists 'key_rank' and 'value_rank' (missing {', '.join(missing)})")
    key, value = data["key_rank"], data["value_rank"]
    for name, ranks in (("key_rank", key), ("value_rank", value)):
        if len(ranks) != n_layer:
            raise LorcError(f"{origin}: {name} has {len(ranks)} entries, the model has {n_layer} layers")
    return list(key), list(value)
