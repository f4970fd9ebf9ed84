"""Input statistics of every layer's K/V projections, and the numpy forward collecting them.

The K and V projections of a llama layer read the same input, the ``attn_norm`` output x (the
norm gain already applied). LoRC's factorization wants to keep ``W x`` accurate on the inputs the
model actually sees, so calibration records, per layer,

* ``mean_sq``  E[x_i^2]            (n_embd,)           the diagonal llama.cpp's imatrix also records
* ``second``   E[x x^T]            (n_embd, n_embd)    for full whitening (float32 on disk/in memory)
* ``mean``     E[x]                (n_embd,)           for the mean (bias) correction

and, for the output-side weighting of the factorization (see ``converter.factorize``),
``q_pair``: the mean energy of the RoPE pairs of the queries that attend to each K row
(rotation-averaged, so one number per adjacent pair of rows). ``collect_stats`` runs the numpy
forward (``forward``); ``runtime_stats`` collects the same sums through llama.cpp.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..format.read import SourceModel
from .forward import LayerWeights, numpy_forward

Progress = Callable[[int, int], None]  # (steps done, steps in all)

# above this many bytes of float64 accumulators (one n_embd x n_embd matrix per layer), the K/V
# inputs go to a file and are reduced one layer at a time once the forward is done, so memory
# holds one layer's statistics, not every layer's: 4 GiB is exactly Llama-3.1-8B (32 x 4096^2 x 8
# bytes); a 70B model (80 x 8192^2 x 8 = 43 GB) spills. A fixed size, like the numpy forward's
STATS_MEMORY_BYTES = 4 * 2**30


def accumulator_bytes(n_layer: int, n_embd: int) -> int:
    """Bytes of the float64 E[x x^T] accumulators of every layer."""
    return 8 * n_layer * n_embd * n_embd


def spills(n_layer: int, n_embd: int, memory_bytes: int | None = None) -> bool:
    """Whether every layer's E[x x^T] goes to disk: its float64 accumulators would exceed
    ``memory_bytes`` (``STATS_MEMORY_BYTES`` by default)."""
    return accumulator_bytes(n_layer, n_embd) > (STATS_MEMORY_BYTES if memory_bytes is None else memory_bytes)


def spill_folder(spill_dir: str | Path | None) -> tempfile.TemporaryDirectory:
    """A temporary folder for spilled statistics in ``spill_dir`` (the system's by default)."""
    return tempfile.TemporaryDirectory(prefix=".lorc-calibration-", dir=spill_dir)


def second_file(folder: str | Path, n_layer: int, n_embd: int) -> np.ndarray:
    """Every layer's E[x x^T], float32, memory-mapped from a new file in ``folder``."""
    return np.lib.format.open_memmap(Path(folder) / "second.npy", mode="w+", dtype=np.float32,
                                     shape=(n_layer, n_embd, n_embd))


@dataclass
class LayerStats:
    """Input statistics of one layer's K/V projections (float64 unless noted)."""

    count: int
    mean: np.ndarray | None  # E[x] (None from an importance matrix)
    mean_sq: np.ndarray  # E[x_i^2]
    second: np.ndarray | None = None  # E[x x^T], float32
    q_pair: np.ndarray | None = None  # (d_k/2,) rotation-averaged query energy per RoPE pair of K rows
    # (chunks, n_embd) float32: the input at each calibration chunk's first position, where
    # attention sinks form (a BOS token's input is the same vector in every chunk)
    first: np.ndarray | None = None

    def covariance(self, centered: bool = False) -> np.ndarray:
        if self.second is None:
            raise ValueError("no second moments recorded")
        c = self.second.astype(np.float64)
        if centered and self.mean is not None:
            c -= np.outer(self.mean, self.mean)
        c += c.T  # numpy buffers the overlapping transpose; two n x n arrays at most, not four
        c *= 0.5
        return c


@dataclass
class CalibrationStats:
    layers: list[LayerStats]
    n_tokens: int
    source: str = "calibration"
    meta: dict = field(default_factory=dict)
    # what keeps memory-mapped arrays of the layers alive (a temporary folder), if anything
    files: Any = field(default=None, repr=False, compare=False)

    def has_full(self) -> bool:
        return all(s.second is not None for s in self.layers)


class LayerSums:
    """Float64 sums of one layer's K/V inputs (x, x^2 and, ``full``, x x^T), each calibration
    chunk's first input, and (numpy forward) the query energies; ``finish`` makes the means.

    ``block_rows``: x x^T is made in float32 over at most this many rows at a time and the blocks
    are added up in float64 (the runtime backend: a block's float32 sum has a relative error of
    about 1e-7 * sqrt(rows), far below the float32 the means are stored in, and float32 GEMM runs
    twice as fast); None: in float64 over everything ``add`` is given (the numpy forward, the
    reference)."""

    def __init__(self, n_embd: int, full: bool, block_rows: int | None = None) -> None:
        self.n = 0
        self.s1 = np.zeros(n_embd)
        self.s2 = np.zeros(n_embd)
        self.xx = np.zeros((n_embd, n_embd)) if full else None
        self.block_rows = block_rows
        self.q: np.ndarray | None = None
        self.firsts: list[np.ndarray] = []

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1])
        step = self.block_rows or max(len(x), 1)
        for i in range(0, len(x), step):
            b = x[i:i + step]
            b64 = b.astype(np.float64)
            self.s1 += b64.sum(0)
            self.s2 += np.square(b64).sum(0)
            if self.xx is not None:
                if self.block_rows:
                    b32 = np.asarray(b, dtype=np.float32)
                    self.xx += b32.T @ b32
                else:
                    self.xx += b64.T @ b64
            self.n += len(b)

    def add_first(self, x0: np.ndarray) -> None:
        """First-position inputs, (chunks, n_embd) or one (n_embd,)."""
        self.firsts.append(np.asarray(x0, dtype=np.float32).reshape(-1, x0.shape[-1]))

    def add_q(self, q_pair_energy: np.ndarray) -> None:
        self.q = q_pair_energy if self.q is None else self.q + q_pair_energy

    def finish(self, second_out: np.ndarray | None = None) -> LayerStats:
        """The means; E[x x^T] written into ``second_out`` (a memory-mapped slot) when given."""
        n = max(self.n, 1)
        second = None
        if self.xx is not None:
            second = (self.xx / n).astype(np.float32)
            if second_out is not None:
                second_out[...] = second
                second = second_out
        q = None if self.q is None else self.q / n
        first = np.concatenate(self.firsts) if self.firsts else None
        return LayerStats(count=self.n, mean=self.s1 / n, mean_sq=self.s2 / n, second=second, q_pair=q, first=first)


def collect_stats(model: SourceModel, chunks: np.ndarray, *, full: bool = True,
                  progress: Progress | None = None) -> CalibrationStats:
    """Run the forward over ``chunks`` and record every layer's K/V input statistics."""
    fwd = numpy_forward(model)
    sh = model.shape
    accs = [LayerSums(sh.n_embd, full) for _ in range(sh.n_layer)]

    def on_layer(il: int, w: LayerWeights, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
        accs[il].add(x)
        accs[il].add_first(x[:, 0])
        # rotation-averaged query energy per RoPE pair of each KV head's rows: the score error
        # q . R (k - k_hat) averages, over relative positions, to per-pair weights (|q_2i|^2 +
        # |q_2i+1|^2) / 2, summed over the query heads of the group
        B, T, _ = x.shape
        hk = sh.head_dim_k
        q = fwd.queries(w, x).reshape(B * T, sh.n_head, hk)
        q = q.reshape(B * T, sh.n_head, 2, hk // 2).swapaxes(-1, -2) if sh.rope_neox else \
            q.reshape(B * T, sh.n_head, hk // 2, 2)  # (tokens, n_head, pair, its two rows)
        e = np.square(q.astype(np.float64)).sum(-1).sum(0) / 2.0  # (n_head, hk/2) summed over tokens
        nkv = w.wk.shape[0] // hk
        e = e.reshape(nkv, sh.n_head // nkv, hk // 2).sum(1).reshape(-1)  # (nkv * hk/2,)
        accs[il].add_q(e)

    n_layer = sh.n_layer
    steps = iter(range(1, n_layer + 1))
    fwd.run(chunks, on_layer=on_layer, progress=None if progress is None else lambda: progress(next(steps), n_layer))
    return CalibrationStats(layers=[a.finish() for a in accs], n_tokens=int(chunks.size))


def save_stats(stats: CalibrationStats, path: str | Path) -> None:
    """Cache statistics as .npz (tools reuse one calibration for many conversions)."""
    arrays: dict[str, np.ndarray] = {"n_tokens": np.asarray(stats.n_tokens), "n_layer": np.asarray(len(stats.layers)),
                                     "meta": np.asarray(json.dumps(stats.meta, sort_keys=True))}
    for il, s in enumerate(stats.layers):
        arrays[f"{il}.count"] = np.asarray(s.count)
        arrays[f"{il}.mean"] = s.mean
        arrays[f"{il}.mean_sq"] = s.mean_sq
        if s.second is not None:
            arrays[f"{il}.second"] = s.second
        if s.q_pair is not None:
            arrays[f"{il}.q_pair"] = s.q_pair
        if s.first is not None:
            arrays[f"{il}.first"] = s.first
    np.savez(path, **arrays)


def load_stats(path: str | Path, spill_dir: str | Path | None = None,
               memory_bytes: int | None = None) -> CalibrationStats:
    """Statistics cached by ``save_stats``. Second moments that ``spills`` (the same rule as the
    runtime backend's, ``memory_bytes`` of float64 accumulators) are copied one layer at a time
    into a memory-mapped file in a temporary folder in ``spill_dir``, as the runtime backend
    leaves them, instead of into memory."""
    with np.load(path) as z:
        n_layer = int(z["n_layer"])
        get = (lambda k: z[k] if k in z.files else None)
        files = second = None
        if "0.second" in z.files and spills(n_layer, len(z["0.mean_sq"]), memory_bytes):
            files = spill_folder(spill_dir)
            second = second_file(files.name, n_layer, len(z["0.mean_sq"]))
        layers = []
        for il in range(n_layer):
            sec = get(f"{il}.second")
            if sec is not None and second is not None:
                second[il] = sec
                sec = second[il]
            layers.append(LayerStats(count=int(z[f"{il}.count"]), mean=z[f"{il}.mean"], mean_sq=z[f"{il}.mean_sq"],
                                     second=sec, q_pair=get(f"{il}.q_pair"), first=get(f"{il}.first")))
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        return CalibrationStats(layers=layers, n_tokens=int(z["n_tokens"]), source=str(path), meta=meta,
                                files=files)
