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
