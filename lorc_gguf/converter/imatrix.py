"""llama.cpp importance matrices (``llama-imatrix``) as per-channel input statistics.

An importance matrix records, for every matrix multiplication weight, the sum over calibration
tokens of each input channel's square. For a K/V projection that is n_tokens * E[x_i^2] of the
attn_norm output, the diagonal LoRC's ``svd-diag-act`` factorization needs. Two formats
(vendored llama.cpp ``tools/imatrix/imatrix.cpp``):

* GGUF (current default): ``general.type = "imatrix"``; per weight NAME two f32 tensors,
  ``NAME.in_sum2`` (ggml [n_per_mat, n_mat]: raw sums of squares) and ``NAME.counts``
  (ggml [1, n_mat]: tokens seen). Mean square = in_sum2 / counts. n_mat > 1 only for MoE experts.
* legacy ``.dat``: int32 n_entries, then per entry int32 name length, name bytes, int32 ncall,
  int32 nval, nval float32 values = (sum / count) * ncall; then int32 last chunk and an int32-length
  dataset name. Mean square = value / ncall.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np

from ..calibration.statistics import CalibrationStats, LayerStats
from ..errors import LorcError
from ..format import keys


def read_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """{weight name: per-input-channel mean square (float64)} from either format."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LorcError(f"cannot read importance matrix {path}: {e.strerror}") from None
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def _read_gguf(path: Path) -> dict[str, np.ndarray]:
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError) as e:
        raise LorcError(f"{path}: unreadable GGUF importance matrix ({e})") from None
    tensors = {t.name: t for t in reader.tensors}
    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        c = tensors.get(base + ".counts")
        if c is None:
            raise LorcError(f"{path}: {name} has no matching {base}.counts")
        sums = np.asarray(t.data, dtype=np.float64).reshape(-1)
        counts = np.asarray(c.data, dtype=np.float64).reshape(-1)
        n_mat = counts.size
        if n_mat == 0 or sums.size % n_mat != 0:
            raise LorcError(f"{path}: {name} has {sums.size} values for {n_mat} matrices")
        sums = sums.reshape(n_mat, -1)
        seen = counts > 0
        if not np.any(seen):
            continue
        # MoE experts: pool the matrices that saw tokens (K/V projections have one)
        out[base] = sums[seen].sum(0) / counts[seen].sum()
    return out


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise LorcError(f"{path}: truncated importance matrix (legacy .dat format)")
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    (n_entries,) = take("<i")
    if n_entries < 0 or n_entries > 1_000_000:
        raise LorcError(f"{path}: not an importance matrix (GGUF or legacy .dat)")
    out: dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (n,) = take("<i")
        if n <= 0 or n > 4096:
            raise LorcError(f"{path}: not an importance matrix (bad name length {n})")
        name = data[pos:pos + n].decode("utf-8", errors="replace")
        pos += n
        ncall, nval = take("<ii")
        if nval < 0 or pos + 4 * nval > len(data):
            raise LorcError(f"{path}: truncated importance matrix entry {name}")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        out[name] = values / max(ncall, 1)
    return out


def imatrix_stats(path: str | Path, n_layer: int) -> CalibrationStats:
    """Diagonal statistics of every layer's K/V input from an importance matrix. K and V read the
    same input; the attn_k entry is used, attn_v where attn_k is missing (they agree)."""
    table = read_imatrix(path)
    layers = []
    for il in range(n_layer):
        ms = table.get(keys.TENSOR_K.format(bid=il))
        if ms is None:
            ms = table.get(keys.TENSOR_V.format(bid=il))
        if ms is None:
            raise LorcError(f"{path}: no entry for {keys.TENSOR_K.format(bid=il)} or "
                            f"{keys.TENSOR_V.format(bid=il)}")
        layers.append(LayerStats(count=0, mean=None, mean_sq=np.asarray(ms, dtype=np.float64)))
    return CalibrationStats(layers=layers, n_tokens=0, source=f"imatrix {path}")


# --- writers (tests, and turning our calibration into an imatrix) -------------------------------

def write_imatrix_gguf(path: str | Path, sums: dict[str, np.ndarray], counts: dict[str, int],
                       chunk_size: int = 512, datasets: tuple[str, ...] = ("calibration",)) -> None:
    """GGUF importance matrix the way llama-imatrix writes it (one matrix per weight)."""
    w = gguf.GGUFWriter(path, arch=None)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", max(1, max(counts.values()) // chunk_size))
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(sums):
        w.add_tensor(name + ".in_sum2", np.asarray(sums[name], dtype=np.float32).reshape(1, -1))
        w.add_tensor(name + ".counts", np.asarray([[counts[name]]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_imatrix_legacy(path: str | Path, sums: dict[str, np.ndarray], counts: dict[str, int],
                         chunk_size: int = 512, dataset: str = "calibration") -> None:
    """Legacy .dat importance matrix (``llama-imatrix --output-format dat``)."""
    parts = [struct.pack("<i", len(sums))]
    last = 0
    for name in sorted(sums):
        b = name.encode()
        ncall = (counts[name] + chunk_size - 1) // chunk_size
        last = max(last, ncall)
        values = (np.asarray(sums[name], dtype=np.float64) / counts[name] * ncall).astype("<f4")
        parts += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, values.size), values.tobytes()]
    d = dataset.encode()
    parts += [struct.pack("<i", last), struct.pack("<i", len(d)), d]
    Path(path).write_bytes(b"".join(parts))
