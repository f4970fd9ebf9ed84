"""A small numpy forward of the llama and qwen2 architectures, straight from a GGUF, used as the
reference for the runtime's latent and hybrid caches. Float64 throughout; RoPE in llama.cpp's NORM
mode (adjacent pairs) for llama, NEOX mode (halves) for qwen2; optional Q/K/V biases; GQA with
query head h reading kv head h // (n_head / n_head_kv); tied or untied output.

``exact(p0, p1)`` decides per (key position, query position) whether attention uses the exact
K/V (the dense projections) or the rank-r ones rebuilt from a LoRC file's factors: the rule of
the hybrid cache, written independently of the runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from lorc_gguf.format import keys as constants


def _tensors(path: Path) -> tuple[dict[str, np.ndarray], gguf.GGUFReader]:
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # numpy order
        out[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(shape)
    return out, reader


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, pos: np.ndarray, base: float, neox: bool = False) -> np.ndarray:
    # x: (T, n_head, head_dim); pair i turns by pos * base^(-2i/head_dim). NORM mode pairs rows
    # (2i, 2i+1), NEOX mode rows (i, i + head_dim/2)
    d = x.shape[-1]
    theta = base ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None, None] * theta[None, None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    first, second = (slice(0, d // 2), slice(d // 2, d)) if neox else (slice(0, d, 2), slice(1, d, 2))
    x0, x1 = x[..., first], x[..., second]
    out = np.empty_like(x)
    out[..., first] = x0 * cos - x1 * sin
    out[..., second] = x0 * sin + x1 * cos
    return out


def forward(original: Path, tokens: list[int], lorc: Path | None = None,
            exact: Callable[[int, int], bool] | None = None) -> np.ndarray:
    """Logits (T, n_vocab). Without ``lorc`` every pair is exact (the original model). With it,
    a pair uses the factorized K/V unless ``exact(p0, p1)`` says otherwise."""
    w, reader = _tensors(original)
    factors = _tensors(lorc)[0] if lorc is not None else {}
    arch = str(_field(reader, "general.architecture"))
    neox = arch == "qwen2"
    n_layer = int(_field(reader, f"{arch}.block_count"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv"))
    eps = float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon"))
    base = float(_field(reader, f"{arch}.rope.freq_base"))
    embd = w["token_embd.weight"]
    head_dim = w["blk.0.attn_q.weight"].shape[0] // n_head
    group = n_head // n_head_kv

    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    x = embd[tokens]
    use_exact = np.ones((T, T), dtype=bool)  # [p1, p0]
    if lorc is not None:
        rule = exact or (lambda p0, p1: False)
        use_exact = np.array([[rule(p0, p1) for p0 in range(T)] for p1 in range(T)])
    causal = np.tril(np.ones((T, T), dtype=bool))

    def bias(il: int, name: str) -> np.ndarray | float:  # qwen2 has Q/K/V biases, llama none
        return w.get(f"blk.{il}.{name}.bias", 0.0)

    for il in range(n_layer):
        h = _rms_norm(x, w[f"blk.{il}.attn_norm.weight"], eps)
        q = _rope((h @ w[f"blk.{il}.attn_q.weight"].T + bias(il, "attn_q")).reshape(T, n_head, head_dim), pos, base, neox)
        kv = {}
        for side, dense, down_t, up_t in (("k", constants.TENSOR_K, constants.TENSOR_K_DOWN, constants.TENSOR_K_UP),
                                          ("v", constants.TENSOR_V, constants.TENSOR_V_DOWN, constants.TENSOR_V_UP)):
            w_dense = w[dense.format(bid=il)]
            down, up = down_t.format(bid=il), up_t.format(bid=il)
            w_lat = factors[up] @ factors[down] if down in factors else w_dense
            b = bias(il, f"attn_{side}")
            kv[side] = [(h @ m.T + b).reshape(T, n_head_kv, head_dim) for m in (w_dense, w_lat)]
        k_ex, k_lat = (_rope(k, pos, base, neox) for k in kv["k"])
        v_ex, v_lat = kv["v"]
        out = np.zeros((T, n_head, head_dim))
        for hq in range(n_head):
            g = hq // group
            s = np.where(use_exact, q[:, hq] @ k_ex[:, g].T, q[:, hq] @ k_lat[:, g].T) / np.sqrt(head_dim)
            s = np.where(causal, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[:, hq] = (p * use_exact) @ v_ex[:, g] + (p * ~use_exact) @ v_lat[:, g]
        x = x + out.reshape(T, -1) @ w[f"blk.{il}.attn_output.weight"].T
        h = _rms_norm(x, w[f"blk.{il}.ffn_norm.weight"], eps)
        gate = h @ w[f"blk.{il}.ffn_gate.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[f"blk.{il}.ffn_up.weight"].T)) @ w[f"blk.{il}.ffn_down.weight"].T
    x = _rms_norm(x, w["output_norm.weight"], eps)
    out_w = w.get("output.weight", embd)
    return x @ out_w.T
