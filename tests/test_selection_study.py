"""tools/selection_study.py's measure (lorc_gguf.evaluation.selection) on a random llama model: the
attention mass each selector misses. The oracle picks the cells with the most mass summed over
heads, which is exactly what the measure (mass averaged over heads) rewards, so no selector can miss
less; a selector that keeps every latent cell misses nothing."""

from __future__ import annotations

import numpy as np
import pytest

import synth
from lorc_gguf import convert
from lorc_gguf.evaluation import selection
from lorc_gguf.format.read import FastGGUFReader

pytest.importorskip("llama_cpp")


def test_no_selector_misses_less_than_the_oracle(tmp_path) -> None:
    original = synth.make_llama_gguf(tmp_path / "o.gguf", n_layer=2, n_embd=128, n_head=4, n_head_kv=2,
                                     head_dim=32, seed=3)
    lorc = tmp_path / "l.gguf"
    convert(original, lorc, allocation="uniform", ratio=0.5, outtype="f32", progress=False, data_free=True,
            sink_tokens=2, recent_window=8)
    s = selection.StudySettings(n_ctx=96, queries=4, sink=2, window=8, chunk=4, ks=(8, 16, 32), layers=(0, 1))
    tokens = [int(t) for t in np.random.default_rng(0).integers(100, 1000, s.n_ctx)]
    fw, inputs = selection.layer_inputs(original, tokens, s.layers)
    reader = FastGGUFReader(lorc)
    for il in s.layers:
        got = selection.study_layer(fw, reader, il, inputs[il], s)
        mass = got[("latent mass", 0)]
        assert 0 < mass <= 1
        for k in s.ks:
            # float64 sums of at most ~100 weights: 1e-9 is far above their rounding
            assert all(got[("oracle", k)] <= got[(name, k)] + 1e-9 for name in selection.SELECTORS)
            assert all(-1e-9 <= got[(name, k)] <= mass + 1e-9 for name in selection.SELECTORS)
        # more cells, less missed
        assert got[("oracle", 32)] < got[("oracle", 8)]
        outs = {key: v for key, v in got.items() if key[0].startswith("out:")}
        # per k: 4 selections, 2 poolings and 3 cuts of the latent values (both layers have them)
        assert len(outs) == 1 + 9 * len(s.ks) and all(0 <= v < np.inf for v in outs.values())


def test_buckets_of_one_cell_are_the_rebuilt_keys_logits(tmp_path) -> None:
    # the runtime's score turns the roped query back to each bucket's middle position: with buckets
    # of one cell that is the cell's own position, and the logits are the rebuilt and roped keys'
    # (float64 throughout: 1e-9 relative is far above its rounding; a turn the wrong way, or by the
    # wrong position, is off by O(1))
    original = synth.make_llama_gguf(tmp_path / "o.gguf", n_layer=1, n_embd=128, n_head=4, n_head_kv=2,
                                     head_dim=32, seed=5)
    lorc = tmp_path / "l.gguf"
    convert(original, lorc, allocation="uniform", ratio=0.5, outtype="f32", progress=False, data_free=True)
    tokens = [int(t) for t in np.random.default_rng(1).integers(100, 1000, 64)]
    fw, inputs = selection.layer_inputs(original, tokens, (0,))
    w, x, cos, sin = inputs[0]
    t = {t.name: t for t in FastGGUFReader(lorc).tensors}
    down = selection._dequant(t["blk.0.attn_k_down.weight"]).astype(np.float64)
    up = selection._dequant(t["blk.0.attn_k_up.weight"]).astype(np.float64)
    x, cos, sin = x.astype(np.float64), cos.astype(np.float64), sin.astype(np.float64)
    c = x @ down.T
    k = fw.rope((c @ up.T).reshape(1, 64, 2, 32), cos, sin)[0]
    q = fw.rope(fw.queries(w, x[None]).astype(np.float64), cos, sin)[0]
    kv = np.arange(4) // 2
    latent = np.arange(40)
    want = np.einsum("hd,nhd->hn", q[63], k[latent][:, kv])
    got = selection.bucket_logits(fw, q[63], up.reshape(2, 32, -1)[kv], c, latent, 63, 1, cos, sin, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    # buckets of 16 cells: the cells at their bucket's middle position stay exact, others move
    wide = selection.bucket_logits(fw, q[63], up.reshape(2, 32, -1)[kv], c, latent, 63, 16, cos, sin, 1.0)
    np.testing.assert_allclose(wide[:, 8::16], want[:, 8::16], rtol=1e-9, atol=1e-9 * np.abs(want).max())
    assert np.abs(wide - want).max() > 1e-3 * np.abs(want).max()
