"""Stage 4: truncated SVD of one weight into LoRC's down/up factors, and their storage encoding.

For a GGUF weight W (numpy shape (width, n_embd), k = W @ x) with SVD W = U S Vt:

    down = Vt[:r]            numpy (r, n_embd)  -> ggml [n_embd, r]     c = down @ x  (cached)
    up   = U[:, :r] * S[:r]  numpy (width, r)   -> ggml [r, width]      k = up @ c

S goes entirely into ``up``: ``down`` then has orthonormal rows, so the cached latent c is a
rotation/projection of x and stays in the input's units (|c| <= |x|), which is what a low
precision cache wants; the up-projection carries the scale. Rows of ``up`` keep the GGUF row order
of ``attn_k``/``attn_v`` (for llama that is already the HF converter's RoPE permutation).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from ..errors import LorcError

QT = gguf.GGMLQuantizationType

# factor storage types offered on the command line
OUTTYPES: dict[str, QT] = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}


@dataclass(frozen=True)
class Factors:
    down: np.ndarray  # (rank, n_embd), float64
    up: np.ndarray  # (width, rank), float64

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def product(self) -> np.ndarray:
        return self.up @ self.down


def _canonical_signs(u: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fix the sign freedom of each singular pair: the largest-|.| entry of every U column is
    positive. LAPACK builds may return either sign; this makes the output bytes depend on W only."""
    idx = np.argmax(np.abs(u), axis=0)
    signs = np.sign(u[idx, np.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    return u * signs, vt * signs[:, None]


def truncated_svd(w: np.ndarray, rank: int) -> Factors:
    """Rank-``rank`` truncated SVD in float64 (the best rank-r approximation, Eckart-Young)."""
    w = np.asarray(w, dtype=np.float64)
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank {rank} outside [1, {min(w.shape)}]")
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    u, vt = _canonical_signs(u, vt)
    return Factors(down=np.ascontiguousarray(vt[:rank]), up=np.ascontiguousarray(u[:, :rank] * s[:rank]))


def relative_error(w: np.ndarray, approx: np.ndarray) -> float:
    """||W - approx||_F / ||W||_F (0 for an all-zero W approximated exactly)."""
    norm = float(np.linalg.norm(w))
    diff = float(np.linalg.norm(np.asarray(w, dtype=np.float64) - approx))
    return diff / norm if norm > 0.0 else diff


def check_encodable(shape: tuple[int, int], qtype: QT, what: str) -> None:
    """Block types need the row length (ggml ne[0], numpy's last axis) to be whole blocks."""
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block_size != 0:
        raise LorcError(f"{what}: row length {shape[-1]} is not a multiple of {block_size}, "
                        f"which {qtype.name.lower()} factors need (choose ranks that are multiples "
                        f"of {block_size}, or --outtype f16)")


def encode(a: np.ndarray, qtype: QT) -> np.ndarray:
    """float64 factor -> the array written to the GGUF (float32/float16, or uint8 blocks)."""
    if qtype == QT.F16:
        out = a.astype(np.float16)  # direct float64 -> float16 rounding (no float32 detour)
    else:
        out = gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), qtype)
    if not np.all(np.isfinite(decode(out, qtype))):
        raise LorcError(f"a factor overflows {qtype.name}; use --outtype f32 or bf16")
    return out


def decode(data: np.ndarray, qtype: QT) -> np.ndarray:
    """Encoded factor -> float64 values the runtime will see."""
    return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float64)
