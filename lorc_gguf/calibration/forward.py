"""The numpy forward that calibration runs: a float32 model straight from the GGUF.

One layer's weights are dequantized at a time and applied to the hidden states of all calibration
tokens, which stay in memory (n_tokens x n_embd float32). ``LlamaForward`` computes llama (and
qwen2): RMSNorm, RoPE in llama.cpp's NORM mode (adjacent pairs; the HF converter permuted the Q/K
rows for it) or NEOX mode, grouped-query causal attention and the SwiGLU FFN, as
``src/models/llama.cpp`` builds them; ``Gemma3Forward`` computes gemma3. Which class computes an
architecture is the ``forward`` of its entry in the registry (``arch``). The same forward computes
logits, which is how it is checked against the runtime.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np

from .. import arch as arch_registry
from ..errors import LorcError
from ..format.read import SourceModel


def _dequant(t) -> np.ndarray:
    """A reader tensor as float32, numpy shape (rows, row length) for matrices."""
    a = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape))
    return np.asarray(a, dtype=np.float32).reshape(shape)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ffn_norm: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    bo: np.ndarray | None = None
    # gemma3: per-head query/key norms and the norms after attention and after the FFN
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None
    post_ffn_norm: np.ndarray | None = None


def rms_norm(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps)) * g


class LlamaForward:
    """Layer-by-layer numpy forward of a llama GGUF (``SourceModel``) in float32.

    ``weights_override(layer) -> dict`` may replace ``wk``/``wv``/``bk``/``bv`` of a layer (used to
    run a factorized model through the same code).
    """

    def __init__(self, model: SourceModel,
                 weights_override: Callable[[int], dict[str, np.ndarray]] | None = None) -> None:
        self.model = model
        self.shape = model.shape
        meta = model.meta
        arch = model.shape.architecture
        if forward_class(arch) is not type(self):
            raise LorcError(f"{type(self).__name__} does not compute the {arch} architecture "
                            f"(calibration supports {', '.join(arch_registry.registered())})")
        self.eps = float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon") or 1e-5)
        self.rope_base = float(meta.get(f"{arch}.rope.freq_base") or 10000.0)
        self.n_rot = int(meta.get(f"{arch}.rope.dimension_count") or self.shape.head_dim_k)
        scaling = meta.get(f"{arch}.rope.scaling.type")
        if scaling not in (None, "none", "linear"):
            raise LorcError(f"rope scaling '{scaling}' is not supported by the calibration forward")
        self.rope_scale = 1.0
        if scaling == "linear":
            self.rope_scale = 1.0 / float(meta.get(f"{arch}.rope.scaling.factor") or 1.0)
        t = model.tensors.get("rope_freqs.weight")
        self.freq_factors = None if t is None else _dequant(t).reshape(-1).astype(np.float64)
        self.override = weights_override
        self._tables: dict[tuple[int, float, float], tuple[np.ndarray, np.ndarray]] = {}

    def _t(self, name: str) -> np.ndarray | None:
        t = self.model.tensors.get(name)
        return None if t is None else _dequant(t)

    def layer(self, il: int) -> LayerWeights:
        p = f"blk.{il}."
        w = LayerWeights(attn_norm=self._t(p + "attn_norm.weight").reshape(-1), wq=self._t(p + "attn_q.weight"),
                         wk=self._t(p + "attn_k.weight"), wv=self._t(p + "attn_v.weight"),
                         wo=self._t(p + "attn_output.weight"), ffn_norm=self._t(p + "ffn_norm.weight").reshape(-1),
                         gate=self._t(p + "ffn_gate.weight"), up=self._t(p + "ffn_up.weight"),
                         down=self._t(p + "ffn_down.weight"),
                         bq=self._t(p + "attn_q.bias"), bk=self._t(p + "attn_k.bias"), bv=self._t(p + "attn_v.bias"),
                         bo=self._t(p + "attn_output.bias"))
        if any(getattr(w, n) is None for n in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "gate", "up", "down")):
            raise LorcError(f"layer {il}: the calibration forward needs a dense llama layer "
                            "(attn_q/k/v/output, ffn_gate/up/down, both norms)")
        if self.override is not None:
            for name, value in self.override(il).items():
                setattr(w, name, None if value is None else np.asarray(value, dtype=np.float32))
        return w

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        t = self.model.tensors["token_embd.weight"]
        flat = tokens.reshape(-1)
        # dequantize only the rows used (the table can be large)
        uniq, inverse = np.unique(flat, return_inverse=True)
        n_embd = self.shape.n_embd
        row_bytes = t.data.shape[-1] if t.data.ndim == 2 else None
        if row_bytes is not None and t.data.shape[0] == int(t.shape[1]):
            rows = gguf.quants.dequantize(t.data[uniq], t.tensor_type)
        else:
            rows = _dequant(t)[uniq]
        rows = np.asarray(rows, dtype=np.float32).reshape(len(uniq), n_embd)
        return rows[inverse].reshape(*tokens.shape, n_embd)

    def _rope_tables(self, n_ctx: int, base: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin for positions 0..n_ctx-1, computed once per (n_ctx, base, scale)."""
        key = (n_ctx, base, scale)
        if key not in self._tables:
            i = np.arange(self.n_rot // 2, dtype=np.float64)
            inv = base ** (-2.0 * i / self.n_rot)
            if self.freq_factors is not None:
                inv = inv / self.freq_factors[: len(inv)]
            ang = (np.arange(n_ctx, dtype=np.float64) * scale)[:, None] * inv[None, :]
            self._tables[key] = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        return self._tables[key]

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x (..., n_ctx, n_head, head_dim); NORM mode rotates adjacent pairs (2i, 2i+1), NEOX mode
        the halves (i, i + n_rot/2)."""
        out = x.copy()
        r = self.n_rot
        first, second = (slice(0, r // 2), slice(r // 2, r)) if self.shape.rope_neox else (slice(0, r, 2), slice(1, r, 2))
        a, b = x[..., first], x[..., second]
        c, s = cos[:, None, :], sin[:, None, :]
        out[..., first] = a * c - b * s
        out[..., second] = a * s + b * c
        return out

    def layer_rope_tables(self, il: int, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
        """The cos/sin tables layer ``il`` ropes with (one set for every layer here)."""
        return self._rope_tables(n_ctx, self.rope_base, self.rope_scale)

    def queries(self, w: LayerWeights, x: np.ndarray) -> np.ndarray:
        """Queries before RoPE, (..., n_head, head_dim)."""
        q = x @ w.wq.T
        if w.bq is not None:
            q = q + w.bq.reshape(-1)
        return q.reshape(*x.shape[:-1], self.shape.n_head, self.shape.head_dim_k)

    def keys(self, w: LayerWeights, x: np.ndarray) -> np.ndarray:
        """Keys before RoPE, (..., n_head_kv, head_dim)."""
        k = x @ w.wk.T
        if w.bk is not None:
            k = k + w.bk.reshape(-1)
        return k.reshape(*x.shape[:-1], k.shape[-1] // self.shape.head_dim_k, self.shape.head_dim_k)

    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.shape.head_dim_k)

    def attention_mask(self, il: int, n_ctx: int) -> np.ndarray:
        return np.triu(np.full((n_ctx, n_ctx), -1e30, dtype=np.float32), 1)

    def attention(self, w: LayerWeights, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, il: int = 0) -> np.ndarray:
        """x (n_chunks, n_ctx, n_embd) normed input -> attention output (same shape)."""
        sh = self.shape
        B, T, _ = x.shape
        hv, nh = sh.head_dim_v, sh.n_head
        q = self.queries(w, x)
        k = self.keys(w, x)
        v = x @ w.wv.T
        if w.bv is not None:
            v = v + w.bv.reshape(-1)
        nkv = k.shape[-2]
        # contiguous operands: numpy's stacked matmul only uses BLAS for those
        q = np.ascontiguousarray(self.rope(q, cos, sin).transpose(0, 2, 1, 3))  # (B,nh,T,hk)
        k = np.ascontiguousarray(self.rope(k, cos, sin).transpose(0, 2, 3, 1))  # (B,nkv,hk,T)
        v = np.ascontiguousarray(v.reshape(B, T, nkv, hv).transpose(0, 2, 1, 3))  # (B, nkv, T, hv)
        group = nh // nkv
        scale = self.attention_scale()
        mask = self.attention_mask(il, T)
        out = np.empty((B, T, nh, hv), dtype=np.float32)
        for h in range(nh):
            g = h // group
            s = np.matmul(q[:, h], k[:, g]) * scale + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            out[:, :, h] = np.matmul(s, v[:, g])
        o = out.reshape(B, T, nh * hv) @ w.wo.T
        if w.bo is not None:
            o = o + w.bo.reshape(-1)
        return o

    def ffn(self, w: LayerWeights, x: np.ndarray) -> np.ndarray:
        g = x @ w.gate.T
        u = x @ w.up.T
        return ((g / (1.0 + np.exp(-g))) * u) @ w.down.T

    def block(self, il: int, w: LayerWeights, h: np.ndarray, x: np.ndarray, cos: np.ndarray,
              sin: np.ndarray) -> np.ndarray:
        """One layer's residual stream update, given its input h and the attn_norm output x."""
        h = h + self.attention(w, x, cos, sin, il)
        return h + self.ffn(w, rms_norm(h, w.ffn_norm, self.eps))

    def run(self, chunks: np.ndarray, on_layer: Callable[[int, LayerWeights, np.ndarray, np.ndarray], None]
            | None = None, progress: Callable[[], None] | None = None, batch: int = 8) -> np.ndarray:
        """Hidden states after the last layer, (n_chunks, n_ctx, n_embd). ``on_layer(il, weights,
        x_normed, q_roped_energy_or_None)`` sees every layer's attn_norm output for all tokens."""
        B, T = chunks.shape
        h = self.embed(chunks)
        for il in range(self.shape.n_layer):
            w = self.layer(il)
            cos, sin = self.layer_rope_tables(il, T)
            for b0 in range(0, B, batch):
                hb = h[b0:b0 + batch]
                x = rms_norm(hb, w.attn_norm, self.eps)
                if on_layer is not None:
                    on_layer(il, w, x, cos, sin)
                h[b0:b0 + batch] = self.block(il, w, hb, x, cos, sin)
            if progress is not None:
                progress()
        return h

    def output_weight(self) -> np.ndarray:
        t = self.model.tensors.get("output.weight") or self.model.tensors["token_embd.weight"]
        return _dequant(t)

    def logits(self, h: np.ndarray, out_w: np.ndarray | None = None) -> np.ndarray:
        norm = self._t("output_norm.weight").reshape(-1)
        return rms_norm(h, norm, self.eps) @ (self.output_weight() if out_w is None else out_w).T


class Gemma3Forward(LlamaForward):
    """gemma3 as ``src/models/gemma3.cpp`` builds it: embeddings scaled by sqrt(n_embd); queries and
    keys RMS-normed per head (``attn_q_norm``/``attn_k_norm``) before NEOX RoPE; sliding-window
    layers (every layer but each sixth by default) attend the last ``sliding_window`` positions and
    rope with their own base; RMS norms after attention and after the GELU FFN, both before the
    residual add; the final logits optionally soft-capped. The converter stores Gemma's norm gains
    with the +1 already added, so every norm here is a plain RMSNorm with gain."""

    def __init__(self, model: SourceModel,
                 weights_override: Callable[[int], dict[str, np.ndarray]] | None = None) -> None:
        super().__init__(model, weights_override)
        meta, sh = model.meta, model.shape
        arch = sh.architecture
        self.rope_base_swa = float(meta.get(f"{arch}.rope.freq_base_swa") or 10000.0)  # llama_hparams default
        self.softcap = float(meta.get(f"{arch}.final_logit_softcapping") or 0.0)
        self.is_swa = [sh.is_swa(il) for il in range(sh.n_layer)]

    def layer(self, il: int) -> LayerWeights:
        w = super().layer(il)
        p = f"blk.{il}."
        for field, name in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm"),
                            ("post_attn_norm", "post_attention_norm"), ("post_ffn_norm", "post_ffw_norm")):
            t = self._t(p + name + ".weight")
            if t is None:
                raise LorcError(f"layer {il}: the gemma3 forward needs {p}{name}.weight")
            setattr(w, field, t.reshape(-1))
        return w

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return super().embed(tokens) * np.float32(math.sqrt(self.shape.n_embd))

    def layer_rope_tables(self, il: int, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
        if self.is_swa[il]:  # llama.cpp: rope_freq_base_train_swa, and no scaling on local layers
            return self._rope_tables(n_ctx, self.rope_base_swa, 1.0)
        return super().layer_rope_tables(il, n_ctx)

    def queries(self, w: LayerWeights, x: np.ndarray) -> np.ndarray:
        return rms_norm(super().queries(w, x), w.q_norm, self.eps)

    def keys(self, w: LayerWeights, x: np.ndarray) -> np.ndarray:
        return rms_norm(super().keys(w, x), w.k_norm, self.eps)

    def attention_scale(self) -> float:
        sh = self.shape
        if sh.n_layer == 62:  # Gemma 3 27B scales by the model width per head, as llama.cpp does
            return 1.0 / math.sqrt(sh.n_embd / sh.n_head)
        return super().attention_scale()

    def attention_mask(self, il: int, n_ctx: int) -> np.ndarray:
        mask = super().attention_mask(il, n_ctx)
        if self.is_swa[il]:
            # LLAMA_SWA_TYPE_STANDARD: a query at p1 sees the cell at p0 while p1 - p0 < window
            mask = mask + np.tril(np.full((n_ctx, n_ctx), -1e30, dtype=np.float32), -self.shape.sliding_window)
        return mask

    def ffn(self, w: LayerWeights, x: np.ndarray) -> np.ndarray:
        g = x @ w.gate.T
        u = x @ w.up.T
        # ggml_gelu: the tanh approximation
        gelu = 0.5 * g * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (g + np.float32(0.044715) * g * g * g)))
        return (gelu * u) @ w.down.T

    def block(self, il: int, w: LayerWeights, h: np.ndarray, x: np.ndarray, cos: np.ndarray,
              sin: np.ndarray) -> np.ndarray:
        h = h + rms_norm(self.attention(w, x, cos, sin, il), w.post_attn_norm, self.eps)
        return h + rms_norm(self.ffn(w, rms_norm(h, w.ffn_norm, self.eps)), w.post_ffn_norm, self.eps)

    def logits(self, h: np.ndarray, out_w: np.ndarray | None = None) -> np.ndarray:
        z = super().logits(h, out_w)
        if self.softcap:
            z = np.tanh(z / self.softcap) * self.softcap
        return z


def forward_class(architecture: str) -> type[LlamaForward]:
    """The numpy forward that computes ``architecture`` (its registry entry names it)."""
    return {cls.__name__: cls for cls in (LlamaForward, Gemma3Forward)}[arch_registry.for_name(architecture).forward]


def numpy_forward(model: SourceModel,
                  weights_override: Callable[[int], dict[str, np.ndarray]] | None = None) -> LlamaForward:
    """The numpy forward for the model's architecture."""
    return forward_class(model.shape.architecture)(model, weights_override)
