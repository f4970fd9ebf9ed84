"""Calibration: input statistics of every layer's K/V projections, measured by running the model.

The K and V projections of a llama layer read the same input, the ``attn_norm`` output x (the
norm gain already applied). LoRC's factorization wants to keep ``W x`` accurate on the inputs the
model actually sees, so this module records, per layer,

* ``mean_sq``  E[x_i^2]            (n_embd,)           the diagonal llama.cpp's imatrix also records
* ``second``   E[x x^T]            (n_embd, n_embd)    for full whitening (float32 on disk/in memory)
* ``mean``     E[x]                (n_embd,)           for the mean (bias) correction

and, for the output-side weighting of the factorization (see ``factorize``), ``q_pair``: the mean
energy of the RoPE pairs of the queries that attend to each K row (rotation-averaged, so one number
per adjacent pair of rows).

The statistics come from a numpy forward of the llama architecture straight from the GGUF
(``LlamaForward``; ``Gemma3Forward`` for gemma3, see ``numpy_forward``): one layer's weights are
dequantized at a time and applied to the hidden states of all calibration tokens, which stay in
memory (n_tokens x n_embd float32). RMSNorm, RoPE in llama.cpp's NORM mode (adjacent pairs; the HF
converter permuted the Q/K rows for it), grouped-query causal attention and the SwiGLU FFN, as
``src/models/llama.cpp`` builds them. The same forward computes logits/perplexity, which is how it
is checked against the runtime.

Text is tokenized with llama.cpp's tokenizer (vocab-only load through llama-cpp-python) and cut into
chunks of ``n_ctx`` tokens whose first token is replaced by BOS, as llama-perplexity does.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from . import corpus
from .arch import Side
from .errors import LorcError
from .load import SourceModel
from .corpus import calibration_text, eval_text, pydoc_text  # noqa: F401 (re-exported)

DEFAULT_CALIB_TOKENS = 16384
Progress = Callable[[int, int], None]  # (steps done, steps in all)
DEFAULT_CTX = 512


# --- text ---------------------------------------------------------------------------------------

# the evaluation half under the name this module has always used
evaluation_text = eval_text


class Tokenizer:
    """llama.cpp's tokenizer of a GGUF (vocab-only load through llama-cpp-python)."""

    def __init__(self, path: str | Path) -> None:
        import llama_cpp as lib

        from .session import silence_llama_logs
        silence_llama_logs()
        self.lib = lib
        params = lib.llama_model_default_params()
        params.vocab_only = True
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise LorcError(f"llama.cpp could not load the vocabulary of {path}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.bos = int(lib.llama_vocab_bos(self.vocab))

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special`` parses control tokens (a chat template's markers)."""
        data = text.encode()
        n_max = len(data) + 16
        buf = (self.lib.llama_token * n_max)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            raise LorcError("tokenization failed")
        return list(buf[:n])

    def close(self) -> None:
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass


def make_chunks(tokens: Sequence[int], n_ctx: int, bos: int, max_chunks: int | None = None) -> np.ndarray:
    """(n_chunks, n_ctx) token ids; each chunk's first token is replaced by BOS (llama-perplexity)."""
    n = len(tokens) // n_ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n < 1:
        raise LorcError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
    chunks = np.asarray(tokens[:n * n_ctx], dtype=np.int64).reshape(n, n_ctx).copy()
    if bos >= 0:
        chunks[:, 0] = bos
    return chunks


# --- the numpy forward --------------------------------------------------------------------------

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
        if _FORWARDS.get(arch) is not type(self):
            raise LorcError(f"{type(self).__name__} does not compute the {arch} architecture "
                            f"(calibration supports {', '.join(_FORWARDS)})")
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
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
        if sh.sliding_window <= 0:
            self.is_swa = [False] * sh.n_layer
        elif isinstance(pattern, (list, tuple)):
            self.is_swa = [bool(p) for p in pattern]
        else:
            n = int(pattern if pattern is not None else 6)  # llama_model_gemma3: load_swa_pattern(ml, 6)
            self.is_swa = [n == 0 or il % n < n - 1 for il in range(sh.n_layer)]

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


# general.architecture -> the numpy forward that computes it
_FORWARDS: dict[str, type[LlamaForward]] = {"llama": LlamaForward, "qwen2": LlamaForward, "gemma3": Gemma3Forward}


def numpy_forward(model: SourceModel,
                  weights_override: Callable[[int], dict[str, np.ndarray]] | None = None) -> LlamaForward:
    """The numpy forward for the model's architecture (LlamaForward refuses one it does not compute)."""
    return _FORWARDS.get(model.shape.architecture, LlamaForward)(model, weights_override)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def chunk_nll(logits: np.ndarray, tokens: np.ndarray, first: int) -> tuple[float, int]:
    """Summed negative log-likelihood of tokens[first+1:] given logits[first:-1] (one chunk)."""
    lp = log_softmax(logits[first:-1].astype(np.float64))
    target = tokens[first + 1:]
    return float(-lp[np.arange(len(target)), target].sum()), len(target)


def numpy_perplexity(fwd: LlamaForward, chunks: np.ndarray) -> float:
    h = fwd.run(chunks)
    out_w = fwd.output_weight()
    nll, n = 0.0, 0
    T = chunks.shape[1]
    for b in range(chunks.shape[0]):
        logits = fwd.logits(h[b, T // 2:], out_w)
        lp = log_softmax(logits[:-1].astype(np.float64))
        target = chunks[b, T // 2 + 1:]
        nll -= float(lp[np.arange(len(target)), target].sum())
        n += len(target)
    return math.exp(nll / n)


# --- statistics ---------------------------------------------------------------------------------

@dataclass
class LayerStats:
    """Input statistics of one layer's K/V projections (float64 unless noted)."""

    count: int
    mean: np.ndarray | None  # E[x] (None from an importance matrix)
    mean_sq: np.ndarray  # E[x_i^2]
    second: np.ndarray | None = None  # E[x x^T], float32
    q_pair: np.ndarray | None = None  # (d_k/2,) rotation-averaged query energy per RoPE pair of K rows

    def covariance(self, centered: bool = False) -> np.ndarray:
        if self.second is None:
            raise ValueError("no second moments recorded")
        c = self.second.astype(np.float64)
        if centered and self.mean is not None:
            c = c - np.outer(self.mean, self.mean)
        return 0.5 * (c + c.T)


@dataclass
class CalibrationStats:
    layers: list[LayerStats]
    n_tokens: int
    source: str = "calibration"
    meta: dict = field(default_factory=dict)

    def has_full(self) -> bool:
        return all(s.second is not None for s in self.layers)


class _Accumulator:
    def __init__(self, n_embd: int, full: bool, q_stats: bool) -> None:
        self.n = 0
        self.s1 = np.zeros(n_embd)
        self.s2 = np.zeros(n_embd)
        self.full = np.zeros((n_embd, n_embd)) if full else None
        self.q = None
        self.q_stats = q_stats

    def add(self, x: np.ndarray) -> None:
        x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
        self.n += x2.shape[0]
        self.s1 += x2.sum(0)
        self.s2 += np.square(x2).sum(0)
        if self.full is not None:
            self.full += x2.T @ x2

    def add_q(self, q_pair_energy: np.ndarray, n: int) -> None:
        self.q = q_pair_energy if self.q is None else self.q + q_pair_energy

    def finish(self) -> LayerStats:
        n = max(self.n, 1)
        second = None if self.full is None else (self.full / n).astype(np.float32)
        q = None if self.q is None else self.q / n
        return LayerStats(count=self.n, mean=self.s1 / n, mean_sq=self.s2 / n, second=second, q_pair=q)


def collect_stats(model: SourceModel, chunks: np.ndarray, *, full: bool = True,
                  progress: Progress | None = None) -> CalibrationStats:
    """Run the forward over ``chunks`` and record every layer's K/V input statistics."""
    fwd = numpy_forward(model)
    sh = model.shape
    accs = [_Accumulator(sh.n_embd, full, True) for _ in range(sh.n_layer)]

    def on_layer(il: int, w: LayerWeights, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
        accs[il].add(x)
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
        accs[il].add_q(e, B * T)

    n_layer = sh.n_layer
    steps = iter(range(1, n_layer + 1))
    fwd.run(chunks, on_layer=on_layer, progress=None if progress is None else lambda: progress(next(steps), n_layer))
    return CalibrationStats(layers=[a.finish() for a in accs], n_tokens=int(chunks.size))


# --- statistics through the runtime ----------------------------------------------------------------

# the graph node whose output every K/V projection reads: llama.cpp names it cb(cur, "attn_norm", il)
# in the llama, qwen2 and gemma3 graphs (the norm with its gain applied)
KV_INPUT_NODE = "attn_norm"
BACKENDS = ("runtime", "numpy")


class _Ggml:
    """The few ggml functions an evaluation callback needs, from the library llama-cpp-python loaded."""

    def __init__(self) -> None:
        import llama_cpp.llama_cpp as ll
        from llama_cpp._ctypes_extensions import load_shared_library

        lib = load_shared_library("ggml-base", ll._base_path)
        lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        lib.ggml_nelements.restype, lib.ggml_nelements.argtypes = ctypes.c_int64, [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.lib = lib

    def name(self, t: int) -> str:
        return self.lib.ggml_get_name(t).decode()

    def read_f32(self, t: int, out: np.ndarray) -> np.ndarray:
        """The tensor's elements (f32, contiguous: what a norm produces) into ``out``, on any backend."""
        n = int(self.lib.ggml_nelements(t))
        view = out[:n]
        self.lib.ggml_backend_tensor_get(t, view.ctypes.data, 0, 4 * n)
        return view


class RuntimeStats:
    """Per-layer K/V input statistics collected by llama.cpp itself: the model runs on its own
    (quantized, memory-mapped) weights, and a graph evaluation callback (``cb_eval``, as
    ``llama-imatrix`` uses) copies every ``attn_norm`` output and accumulates its sums in float64.
    Runs on whatever backend the runtime was built for."""

    def __init__(self, path: Path, n_layer: int, n_embd: int, n_ctx: int, full: bool = True,
                 threads: int | None = None) -> None:
        import llama_cpp as lib

        from .session import silence_llama_logs
        silence_llama_logs()
        self.lib, self.ggml = lib, _Ggml()
        self.n_layer, self.n_embd, self.n_ctx = n_layer, n_embd, n_ctx
        self.s1 = np.zeros((n_layer, n_embd))
        self.s2 = np.zeros((n_layer, n_embd))
        self.second = [np.zeros((n_embd, n_embd)) for _ in range(n_layer)] if full else None
        self.count = np.zeros(n_layer, dtype=np.int64)
        self._buf = np.empty(n_ctx * n_embd, dtype=np.float32)
        self._error: BaseException | None = None
        self._callback = lib.ggml_backend_sched_eval_callback(self._on_node)
        mparams = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise LorcError(f"llama.cpp could not load {path} for calibration")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        threads = threads or max(1, os.cpu_count() or 1)
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.cb_eval = self._callback
        cparams.cb_eval_user_data = None
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise LorcError(f"llama.cpp could not create a context of {n_ctx} tokens for calibration")
        self.batch = lib.llama_batch_init(n_ctx, 0, 1)

    def _on_node(self, t: int, ask: bool, user_data: int) -> bool:
        # runs inside llama_decode: an exception cannot cross the C frames, so it is kept and the
        # computation stopped (returning False), and run() raises it
        try:
            name = self.ggml.name(t)
            prefix, _, layer = name.rpartition("-")
            if prefix != KV_INPUT_NODE:
                return not ask
            if ask:
                return True
            x = self.ggml.read_f32(t, self._buf).reshape(-1, self.n_embd)
            il = int(layer)
            x64 = x.astype(np.float64)
            self.s1[il] += x64.sum(0)
            self.s2[il] += np.square(x64).sum(0)
            if self.second is not None:
                self.second[il] += x64.T @ x64
            self.count[il] += x.shape[0]
            return True
        except BaseException as e:  # noqa: BLE001 (KeyboardInterrupt included)
            self._error = e
            return False

    def run(self, chunk: np.ndarray) -> None:
        lib, b = self.lib, self.batch
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        b.n_tokens = len(chunk)
        for i, tok in enumerate(chunk):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(tok), i, 1, 0
            b.seq_id[i][0] = 0
        b.logits[len(chunk) - 1] = 1
        rc = lib.llama_decode(self.ctx, b)
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if rc != 0:
            raise LorcError(f"llama_decode failed ({rc}) during calibration")

    def finish(self, n_tokens: int) -> CalibrationStats:
        layers = []
        for il in range(self.n_layer):
            n = max(int(self.count[il]), 1)
            if self.count[il] != n_tokens:
                raise LorcError(f"calibration saw {self.count[il]} inputs of layer {il}, expected {n_tokens}: "
                                f"the runtime's graph has no '{KV_INPUT_NODE}-{il}' node for this architecture")
            second = None if self.second is None else (self.second[il] / n).astype(np.float32)
            layers.append(LayerStats(count=int(self.count[il]), mean=self.s1[il] / n, mean_sq=self.s2[il] / n,
                                     second=second))
        return CalibrationStats(layers=layers, n_tokens=n_tokens, source="calibration")

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    def __enter__(self) -> RuntimeStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect_stats_runtime(model: SourceModel, chunks: np.ndarray, *, full: bool = True,
                          progress: Progress | None = None, threads: int | None = None) -> CalibrationStats:
    """``collect_stats`` through the runtime (``RuntimeStats``); no query statistics (q_pair)."""
    sh = model.shape
    with RuntimeStats(model.path, sh.n_layer, sh.n_embd, chunks.shape[1], full=full, threads=threads) as rt:
        for i, chunk in enumerate(chunks):
            rt.run(chunk)
            if progress is not None:
                progress(i + 1, len(chunks))
        return rt.finish(int(chunks.size))


def chat_renderer(model: SourceModel) -> corpus.ChatRender:
    """The model's chat template (``tokenizer.chat_template``), or a plain User:/Assistant: form."""
    template = model.meta.get("tokenizer.chat_template")
    if not template:
        return corpus.plain_chat
    eos = ""
    eos_id, tokens = model.meta.get("tokenizer.ggml.eos_token_id"), model.meta.field("tokenizer.ggml.tokens")
    if eos_id is not None and tokens is not None and 0 <= int(eos_id) < len(tokens.data):
        eos = tokens.contents(int(eos_id))
    return corpus.template_renderer(str(template), eos)


# characters of text cut for one chunk of n_ctx tokens: tokens run 2.5-4.5 characters in every
# domain (SmolLM2 and Gemma 3 tokenizers), so a chunk always fills with room to spare
SEGMENT_CHARS_PER_TOKEN = 12


def segment_starts(n_chars: int, segment: int, n: int, text: str) -> list[int]:
    """``n`` start offsets spread evenly over a text of ``n_chars``, each moved to the next line
    start, leaving room for a ``segment`` after it."""
    last = max(n_chars - segment, 0)
    starts = []
    for i in range(n):
        at = (i * last) // max(n, 1)
        nl = text.find("\n", at, at + segment // 2)
        starts.append(at if nl < 0 else nl + 1)
    return starts


def calibration_chunks(model: SourceModel, text: str | None = None, n_tokens: int = DEFAULT_CALIB_TOKENS,
                       n_ctx: int = DEFAULT_CTX, domains: Sequence[str] | None = None) -> tuple[np.ndarray, dict]:
    """(n_chunks, n_ctx) calibration tokens and a description of where they came from.

    ``text`` is one text, cut into consecutive chunks; without it the built-in domains (default:
    every calibration domain of ``corpus``) share the chunks equally, each domain's chunks cut from
    segments spread evenly over its text (only those segments are tokenized)."""
    tok = Tokenizer(model.path)
    try:
        if text is not None:
            tokens = tok.tokenize(text, add_bos=False)
            n_ctx = max(2, min(n_ctx, n_tokens, len(tokens)))
            chunks = make_chunks(tokens, n_ctx, tok.bos, max_chunks=max(1, n_tokens // n_ctx))
            return chunks, {"n_ctx": n_ctx, "n_chunks": int(chunks.shape[0])}
        names = corpus.parse_domains(domains or corpus.CALIBRATION_DOMAINS, corpus.CALIBRATION)
        render = chat_renderer(model)
        n_ctx = max(2, min(n_ctx, n_tokens))
        n_chunks = max(1, n_tokens // n_ctx)
        per = [n_chunks // len(names) + (1 if i < n_chunks % len(names) else 0) for i in range(len(names))]
        rows, used = [], {}
        segment = n_ctx * SEGMENT_CHARS_PER_TOKEN
        for name, n in zip(names, per):
            d = corpus.domain(name)
            body = d.text(corpus.CALIBRATION, render)
            for start in segment_starts(len(body), segment, n, body):
                ids = tok.tokenize(body[start:start + segment], add_bos=False, special=d.chat)
                if len(ids) < n_ctx:
                    raise LorcError(f"the {name} text is too short for chunks of {n_ctx} tokens")
                rows.append(ids[:n_ctx])
            used[name] = n
        chunks = np.asarray(rows, dtype=np.int64)
        if tok.bos >= 0:
            chunks[:, 0] = tok.bos
        return chunks, {"n_ctx": n_ctx, "n_chunks": int(chunks.shape[0]), "domains": used}
    finally:
        tok.close()


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


def side_stats(stats: CalibrationStats, side: Side, layer: int) -> LayerStats:
    """K and V read the same input: one LayerStats per layer serves both sides."""
    return stats.layers[layer]


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
    np.savez(path, **arrays)


def load_stats(path: str | Path) -> CalibrationStats:
    with np.load(path) as z:
        layers = []
        for il in range(int(z["n_layer"])):
            get = (lambda k: z[k] if k in z.files else None)
            layers.append(LayerStats(count=int(z[f"{il}.count"]), mean=z[f"{il}.mean"], mean_sq=z[f"{il}.mean_sq"],
                                     second=get(f"{il}.second"), q_pair=get(f"{il}.q_pair")))
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        return CalibrationStats(layers=layers, n_tokens=int(z["n_tokens"]), source=str(path), meta=meta)
