"""How well selective reconstruction's selectors find the latent cells a decoded token attends.

A numpy study, not a runtime path: for a llama-architecture LoRC file and its original, one chunk of
text goes through the original's numpy forward (calibration.forward) up to the studied layers; each
of the last ``queries`` positions then acts as a decoded token of a hybrid cache (``sink`` exact
cells, an exact window of ``window``), and every selector picks k of the latent cells outside them.
The measure is the attention mass a selector misses: the share of the softmax (over latent and exact
cells, with the file's rebuilt and roped latent keys and the original's exact keys) that falls on
latent cells it did not pick, averaged over heads and queries. Selectors:

- ``cell``: the runtime's score (README, "Selective reconstruction"): cells in buckets of 256 by
  cell index, per bucket the roped query turned back to the position of the bucket's middle cell
  (the last filled one if that is later), per head the softmax of c·(Bᵀ R(-p_b) q), summed over
  heads; ``cell-bucket-N`` the same with buckets of N cells; ``cell-max-head`` the largest per-head
  weight in place of the sum;
- ``cell-span-N``: the runtime's earlier score, c·(Bᵀq) with the rotary pairs slower than one radian
  in N positions taken as unrotated and the others dropped (0: every dim, as if unrotated);
- ``chunk-mean``: chunks of ``chunk`` consecutive cells scored by their mean latent row (the
  landmark of ShadowKV / xKV), the best k/chunk chunks taken whole;
- ``chunk-bound``: chunks scored by the upper bound Σ max(q·max, q·min) of their rows (Quest);
- ``two-stage-mean`` / ``two-stage-bound``: the chunk score keeps 4k cells' worth of chunks, then
  the cell score picks k among them;
- ``oracle``: the k cells with the most true attention mass (summed over heads).

A second measure is the attention output itself (values lifted from the file's latent values),
as a relative error against every latent key rebuilt: the runtime's selection (the rest left out),
the oracle's, one selection per KV head (each KV head's k best by its query heads' summed
weights), the k best rebuilt with every other latent cell attended at the score's bucketed
logits, the same with the rest's values pooled (each head keeps its weight on the rest, but all
heads, or each KV head's query heads, share one value: the rest's latent values averaged by the
heads' summed weights) or cut to their first 16 / 32 / 64 latent dims, and no key rebuilt at all
(every latent cell at the bucketed logits). The pooled rows rank above leaving the rest out here,
while the runtime's perplexity ranks pooling below it (results/topk-w384-drama-pooled.md): this
measure does not settle an approximation of the values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..calibration.forward import _dequant, numpy_forward, rms_norm
from ..errors import LorcError
from ..format.read import FastGGUFReader, open_gguf

TRUNC_DIMS = (16, 32, 64)  # the rest's latent values cut to their first dims (the out:cell+trunc-N rows)
SCORE_BUCKET = 256  # the runtime's LORC_SCORE_BUCKET (patch 'graph : selective reconstruction ...')
# variants of the cell score: other buckets, the largest per-head weight of a cell in place of the sum
# over heads, and the earlier score of the slow pairs unrotated over spans of 256 (its runtime
# setting), 16, 4096 and 0 (every pair, rotated or not, taken as unrotated)
BUCKETS = (32, 64)
SPANS = (256.0, 16.0, 4096.0, 0.0)
SELECTORS = ("cell", *(f"cell-bucket-{b}" for b in BUCKETS), "cell-max-head",
             *(f"cell-span-{int(x)}" for x in SPANS), "chunk-mean", "chunk-bound",
             "two-stage-mean", "two-stage-bound", "oracle")


@dataclass
class StudySettings:
    n_ctx: int = 4096
    queries: int = 32
    sink: int = 4
    window: int = 384
    chunk: int = 8
    ks: tuple[int, ...] = (64, 128, 256, 512)
    layers: tuple[int, ...] = (2, 8, 14, 20, 26)


def layer_inputs(original_path, tokens: list[int], layers: tuple[int, ...]) -> tuple[object, dict]:
    """(the numpy forward, {layer: (weights, attn_norm output [T, n_embd], cos, sin)})."""
    model = open_gguf(original_path)
    if model.shape.architecture != "llama":
        raise LorcError(f"the selection study computes llama files only, not {model.shape.architecture}")
    fw = numpy_forward(model)
    h = fw.embed(np.array([tokens]))
    out = {}
    for il in range(max(layers) + 1):
        w = fw.layer(il)
        cos, sin = fw.layer_rope_tables(il, len(tokens))
        x = rms_norm(h, w.attn_norm, fw.eps)
        if il in layers:
            out[il] = (w, x[0], cos, sin)
        h = fw.block(il, w, h, x, cos, sin)
    return fw, out


def _softmax_sum(scores: np.ndarray, reduce=np.sum) -> np.ndarray:
    """Per-head softmax over the last axis, summed (or reduced) over heads (axis 0)."""
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return reduce(e / e.sum(-1, keepdims=True), axis=0)


def _score_dims(fw, hd: int, span: float) -> np.ndarray:
    """The head dims the latent score uses: the rotary pairs (llama ropes pairs (2i, 2i+1)) that turn
    by less than one radian over ``span`` positions and any unrotated dims; span 0: every dim."""
    i0 = 0
    while span and i0 < fw.n_rot // 2 and fw.rope_scale * fw.rope_base ** (-2.0 * i0 / fw.n_rot) * span >= 1.0:
        i0 += 1
    return np.arange(2 * i0, hd)


def _top(score: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-score, k)[:k]


def bucket_logits(fw, q_t: np.ndarray, b_heads: np.ndarray, c: np.ndarray, latent: np.ndarray, t: int,
                  n_cells: int, cos: np.ndarray, sin: np.ndarray, scale: float) -> np.ndarray:
    """The runtime's latent logits [n_head, len(latent)] of the cells ``latent`` (cell index =
    position) for the roped query ``q_t`` [n_head, hd] at position t: buckets of ``n_cells`` cells,
    each meeting the query turned back to its middle position (or t, the last filled cell, if that
    is earlier), taken through ``b_heads`` [n_head, hd, rank] onto the latent rows ``c``. Buckets of
    one cell give the rebuilt and roped keys' logits exactly."""
    anchors = np.minimum(latent // n_cells * n_cells + n_cells // 2, t)
    out = np.empty((q_t.shape[0], len(latent)))
    for a in np.unique(anchors):
        at = anchors == a
        q_back = fw.rope(q_t[None], cos[a:a + 1], -sin[a:a + 1])[0]  # R(-a) q
        out[:, at] = np.einsum("hdr,hd->hr", b_heads, q_back) * scale @ c[latent[at]].T
    return out


def study_layer(fw, lorc: FastGGUFReader, il: int, inputs, s: StudySettings) -> dict[tuple[str, int], float]:
    """Missed attention mass per (selector, k), and ("latent mass", 0): the latent cells' share."""
    w, x, cos, sin = inputs
    tensors = {t.name: t for t in lorc.tensors}
    down = _dequant(tensors[f"blk.{il}.attn_k_down.weight"])  # [rank, n_embd]
    up = _dequant(tensors[f"blk.{il}.attn_k_up.weight"])      # [n_embd_k_gqa, rank]
    sh = fw.shape
    n_head, hd = sh.n_head, sh.head_dim_k
    n_kv = up.shape[0] // hd
    group = n_head // n_kv
    T = x.shape[0]
    c = x @ down.T                                              # latent rows [T, rank]
    k_lat = fw.rope((c @ up.T).reshape(1, T, n_kv, hd), cos, sin)[0]
    k_exact = fw.rope(fw.keys(w, x[None]), cos, sin)[0]         # the file keeps attn_k for exact cells
    q_pre = fw.queries(w, x[None])[0]                           # [T, n_head, hd]
    q = fw.rope(q_pre[None], cos, sin)[0]
    scale = fw.attention_scale()
    kv = np.arange(n_head) // group                             # each head's KV head
    b_heads = up.reshape(n_kv, hd, -1)[kv]                      # [n_head, hd, rank]
    dims = {span: _score_dims(fw, hd, span) for span in SPANS}
    b_dims = {span: b_heads[:, d] for span, d in dims.items()}  # [n_head, dims, rank]

    v_exact = x @ w.wv.T + (0 if w.bv is None else w.bv.reshape(-1))
    v_lat = v_exact  # a layer whose values the file keeps whole
    v_trunc = {}     # the latent values' leading dims only, lifted
    if f"blk.{il}.attn_v_down.weight" in tensors:
        c_v = x @ _dequant(tensors[f"blk.{il}.attn_v_down.weight"]).T
        up_v = _dequant(tensors[f"blk.{il}.attn_v_up.weight"])
        v_lat = c_v @ up_v.T
        v_trunc = {d: (c_v[:, :d] @ up_v[:, :d].T).reshape(T, n_kv, -1) for d in TRUNC_DIMS}
    v_lat, v_exact = v_lat.reshape(T, n_kv, -1), v_exact.reshape(T, n_kv, -1)

    def whole(chunks: np.ndarray) -> np.ndarray:
        return (chunks[:, None] * s.chunk + np.arange(s.chunk)).reshape(-1)

    sums: dict[tuple[str, int], list[float]] = {}
    for t in range(T - s.queries, T):
        latent = np.arange(s.sink, t - s.window + 1)
        exact = np.concatenate([np.arange(s.sink), np.arange(t - s.window + 1, t + 1)])
        n_lat = len(latent)
        s_lat = np.einsum("hd,hnd->hn", q[t], k_lat[latent][:, kv].transpose(1, 0, 2)) * scale
        s_ex = np.einsum("hd,hnd->hn", q[t], k_exact[exact][:, kv].transpose(1, 0, 2)) * scale
        m = np.maximum(s_lat.max(1), s_ex.max(1))[:, None]
        e_lat, e_ex = np.exp(s_lat - m), np.exp(s_ex - m)
        weights = e_lat / (e_lat.sum(1) + e_ex.sum(1))[:, None]   # [n_head, n_lat]
        val_lat = v_lat[latent][:, kv].transpose(1, 0, 2)           # [n_head, n_lat, hd_v]
        val_ex = v_exact[exact][:, kv].transpose(1, 0, 2)

        def output(lat_logits: np.ndarray, rest_sum=None, sel=None) -> np.ndarray:
            """[n_head, hd_v] with the latent cells at ``lat_logits`` (-inf: a cell left out). With
            ``rest_sum``, only the ``sel`` cells take their latent values; ``rest_sum(p)`` takes the other
            cells' softmax weights [n_head, n_lat] (zero at ``sel``) to their share of the output"""
            mx = np.maximum(lat_logits.max(1), s_ex.max(1))[:, None]
            el, ee = np.exp(lat_logits - mx), np.exp(s_ex - mx)
            z = (el.sum(1) + ee.sum(1))[:, None]
            out = np.einsum("hn,hnd->hd", ee, val_ex) / z
            if rest_sum is None:
                return out + np.einsum("hn,hnd->hd", el, val_lat) / z
            rest = el / z
            rest[:, sel] = 0
            return out + np.einsum("hn,hnd->hd", el[:, sel], val_lat[:, sel]) / z + rest_sum(rest)

        full = output(s_lat)

        def pooled(pool: np.ndarray):  # each head's weight on the rest times its pool's mean value
            def rest_sum(p: np.ndarray) -> np.ndarray:
                w = pool @ p
                return p.sum(1)[:, None] * np.einsum("hn,hnd->hd", w, val_lat) / w.sum(1)[:, None]
            return rest_sum

        def rel_error(out: np.ndarray) -> float:
            return float(np.mean(np.linalg.norm(out - full, axis=1) / np.linalg.norm(full, axis=1)))

        def out_error(lat_logits: np.ndarray) -> float:
            return rel_error(output(lat_logits))

        def latent_query(span: float) -> np.ndarray:  # [n_head, rank]
            return np.einsum("hdr,hd->hr", b_dims[span], q_pre[t][:, dims[span]]) * scale

        def logits_of(n_cells: int) -> np.ndarray:
            return bucket_logits(fw, q[t], b_heads, c, latent, t, n_cells, cos, sin, scale)

        logits = logits_of(SCORE_BUCKET)
        cell = _softmax_sum(logits)
        per_kv = _softmax_sum(logits.reshape(n_kv, group, n_lat).transpose(1, 0, 2))  # [n_kv, n_lat]
        span_queries = {x: latent_query(x) for x in SPANS}
        variants = {f"cell-span-{int(x)}": _softmax_sum(span_queries[x] @ c[latent].T) for x in SPANS}
        variants.update({f"cell-bucket-{b}": _softmax_sum(logits_of(b)) for b in BUCKETS})
        variants["cell-max-head"] = _softmax_sum(logits, np.max)
        n_chunk = n_lat // s.chunk
        rows = c[latent[:n_chunk * s.chunk]].reshape(n_chunk, s.chunk, -1)
        q_lat = span_queries[SPANS[0]]  # the chunk schemes score with the earlier (unbucketed) query
        chunk_mean = _softmax_sum(q_lat @ rows.mean(1).T)
        hi, lo = rows.max(1), rows.min(1)
        chunk_bound = _softmax_sum(np.maximum(q_lat[:, None] * hi[None], q_lat[:, None] * lo[None]).sum(-1))
        tail = np.arange(n_chunk * s.chunk, n_lat)  # a partial last chunk: always scored per cell
        mass = weights.sum(1).mean()
        sums.setdefault(("latent mass", 0), []).append(mass)
        sums.setdefault(("out:approximate", 0), []).append(out_error(logits))
        for k in s.ks:
            if k >= n_lat or k < s.chunk:
                continue

            def two_stage(chunk_score: np.ndarray) -> np.ndarray:
                keep = np.concatenate([whole(_top(chunk_score, min(n_chunk - 1, 4 * k // s.chunk))), tail])
                return keep[_top(cell[keep], k)]

            picks = {"cell": _top(cell, k), "chunk-mean": whole(_top(chunk_mean, k // s.chunk)),
                     "chunk-bound": whole(_top(chunk_bound, k // s.chunk)),
                     "two-stage-mean": two_stage(chunk_mean), "two-stage-bound": two_stage(chunk_bound),
                     "oracle": _top(weights.sum(0), k), **{n: _top(v, k) for n, v in variants.items()}}
            for name, idx in picks.items():
                sums.setdefault((name, k), []).append(mass - weights[:, idx].sum(1).mean())
            # the attention output: the picked cells rebuilt and the rest left out, or the rest
            # attended at the score's own (bucketed) logits
            for name in ("cell", "oracle"):
                kept = np.full_like(s_lat, -np.inf)
                kept[:, picks[name]] = s_lat[:, picks[name]]
                sums.setdefault((f"out:{name}", k), []).append(out_error(kept))
            # one selection per KV head (its query heads' weights summed), the rest left out
            kept = np.full_like(s_lat, -np.inf)
            kv_picks = [_top(score, k) for score in per_kv]  # once per KV head, for all its query heads
            for h in range(n_head):
                kept[h, kv_picks[kv[h]]] = s_lat[h, kv_picks[kv[h]]]
            sums.setdefault(("out:cell-per-kv-head", k), []).append(out_error(kept))
            rest = logits.copy()
            rest[:, picks["cell"]] = s_lat[:, picks["cell"]]
            sums.setdefault(("out:cell+approximate", k), []).append(out_error(rest))
            # the rest with its latent values' leading dims only
            for d, vt in v_trunc.items():
                val_t = vt[latent][:, kv].transpose(1, 0, 2)
                sums.setdefault((f"out:cell+trunc-{d}", k), []).append(
                    rel_error(output(rest, lambda p: np.einsum("hn,hnd->hd", p, val_t), picks["cell"])))
            # the rest pooled: each head keeps its mass over the cells left out (at the bucketed
            # logits) but they share one value, the mean of their latent values weighted by the
            # heads' weights summed (over all heads, or over each KV head's query heads)
            for name, pool in (("cell+pooled", np.ones((n_head, n_head))),
                               ("cell+pooled-per-kv-head", (kv[:, None] == kv[None]).astype(float))):
                sums.setdefault((f"out:{name}", k), []).append(rel_error(output(rest, pooled(pool), picks["cell"])))
    return {key: float(np.mean(v)) for key, v in sums.items()}


def run_study(original, lorc_path, text: str, s: StudySettings, log=lambda m: None) -> dict:
    """The study on the first ``s.n_ctx`` tokens of an evaluation text (corpus domain or file)."""
    from dataclasses import asdict
    from pathlib import Path

    from .. import corpus
    from ..format import keys
    from ..runtime.session import Session, SessionParams

    raw = Path(text).read_text() if Path(text).is_file() else corpus.domain(text).text(corpus.EVALUATION,
                                                                                       corpus.plain_chat)
    with Session(original, SessionParams(n_ctx=512)) as sess:
        tokens = sess.tokenize(raw, add_bos=True)[:s.n_ctx]
    if len(tokens) < s.n_ctx:
        raise LorcError(f"{text}: {len(tokens)} tokens, fewer than --ctx {s.n_ctx}")
    lorc = FastGGUFReader(lorc_path)
    if keys.KEY_VERSION not in lorc.fields:
        raise LorcError(f"{lorc_path} is not a LoRC file")
    log(f"numpy forward of {s.n_ctx} tokens up to layer {max(s.layers)} ...")
    fw, inputs = layer_inputs(original, tokens, s.layers)
    per_layer = {}
    for il in s.layers:
        log(f"layer {il}")
        per_layer[il] = {f"{name}@{k}": v for (name, k), v in study_layer(fw, lorc, il, inputs[il], s).items()}
    return {"original": str(original), "lorc": str(lorc_path), "text": text, "settings": asdict(s),
            "per_layer": per_layer}


def format_study(report: dict) -> str:
    s = report["settings"]
    per_layer = report["per_layer"]
    keys_ = {k for r in per_layer.values() for k in r}
    mean = {k: float(np.mean([r[k] for r in per_layer.values() if k in r])) for k in keys_}
    lines = ["| selector | " + " | ".join(f"k = {k}" for k in s["ks"]) + " |", "|---|" + "---:|" * len(s["ks"])]
    for name in SELECTORS:
        lines.append(f"| {name} | " + " | ".join(f"{mean[f'{name}@{k}']:.3f}" if f"{name}@{k}" in mean else "-"
                                                for k in s["ks"]) + " |")
    lines += ["", f"Attention mass missed (lower is better) of the latent cells' {mean['latent mass@0']:.3f}, "
              f"text {report['text']}, ctx {s['n_ctx']}, the last {s['queries']} positions as decoded tokens, "
              f"{s['sink']} sinks + a window of {s['window']} exact, chunks of {s['chunk']}; mean over layers "
              f"{', '.join(map(str, per_layer))} and heads."]
    if "out:approximate@0" in mean:
        lines += ["", "| attention output | " + " | ".join(f"k = {k}" for k in s["ks"]) + " |",
                  "|---|" + "---:|" * len(s["ks"])]
        for name, label in (("cell", "k best by the score rebuilt, the rest left out (the runtime)"),
                            ("oracle", "the oracle's k rebuilt, the rest left out"),
                            ("cell-per-kv-head", "k best per KV head by the score rebuilt (one selection per "
                                                 "KV head), the rest left out"),
                            ("cell+approximate", "k best rebuilt, the rest at the score's bucketed logits"),
                            ("cell+pooled", "k best rebuilt, the rest at the bucketed logits sharing one "
                                            "value (the heads' summed weights)"),
                            ("cell+pooled-per-kv-head", "k best rebuilt, the rest at the bucketed logits "
                                                        "sharing one value per KV head"),
                            *((f"cell+trunc-{d}", f"k best rebuilt, the rest at the bucketed logits with "
                                                  f"their latent values' first {d} dims") for d in TRUNC_DIMS)):
            lines.append(f"| {label} | " + " | ".join(f"{mean[f'out:{name}@{k}']:.4f}" if f"out:{name}@{k}" in mean
                                                     else "-" for k in s["ks"]) + " |")
        lines.append("| none rebuilt, every latent cell at the bucketed logits | "
                     + " | ".join(f"{mean['out:approximate@0']:.4f}" for _ in s["ks"]) + " |")
        lines += ["", "Relative error of the attention output (latent values lifted; mean over layers, heads and "
                  "queries) against every latent key rebuilt."]
    return "\n".join(lines)
