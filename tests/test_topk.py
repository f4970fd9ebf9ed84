"""Selective reconstruction of latent keys (patch 0009, LLAMA_LORC_TOP_K): a decoded token
rebuilds only the k latent cells that score best in latent space. With k at least the number of
visible cells it must give the full path's logits (only summation order changes); with a small k
it must change them; prompt processing must not be affected at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import synth
from lorc_gguf import convert
from lorc_gguf.evaluate import top_k_in_effect
from lorc_gguf.session import TOP_K_ENV, Session, SessionParams, hybrid_override, silence_llama_logs, top_k_override

pytest.importorskip("llama_cpp")
silence_llama_logs()

PREFILL, STEPS = 40, 24
# n_ctx 512: llama.cpp pads the attended cells to 256, so k = 200 selects fewer cells than the
# graph holds (the selection path runs) but more than the PREFILL + STEPS visible ones
ALL_VISIBLE, FEW = 200, 8


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("topk")
    original = synth.make_llama_gguf(d / "original.gguf", n_layer=3, n_embd=256, n_head=8, n_head_kv=2,
                                     head_dim=64, n_ff=512, seed=11)
    plain, hybrid, hybrid_top_k = d / "plain.gguf", d / "hybrid.gguf", d / "hybrid-top-k.gguf"
    convert(original, plain, allocation="uniform", ratio=0.5, outtype="f32", progress=False, data_free=True)
    convert(original, hybrid, allocation="uniform", ratio=0.5, outtype="f32", progress=False, data_free=True,
            sink_tokens=4, recent_window=8)
    convert(original, hybrid_top_k, allocation="uniform", ratio=0.5, outtype="f32", progress=False, data_free=True,
            sink_tokens=4, recent_window=8, decode_top_k=FEW)
    return {"plain": plain, "hybrid": hybrid, "hybrid-top-k": hybrid_top_k}


def prompt(seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, synth.VOCAB_SIZE - 100, PREFILL + STEPS)]


def decode_steps(path: Path, k: int | None, tokens: list[int], cache: str = "f32") -> tuple[np.ndarray, np.ndarray]:
    """(prefill logits, one logits row per single-token decode step)"""
    with top_k_override(k or 0), Session(path, SessionParams(n_ctx=512, cache_type_k=cache, cache_type_v="f32")) as s:
        prefill = s.decode_seq(tokens[:PREFILL])
        steps = np.stack([s.decode_seq([t], pos0=PREFILL + i)[0] for i, t in enumerate(tokens[PREFILL:])])
    return prefill, steps


@pytest.mark.parametrize("name,cache", [("plain", "f32"), ("hybrid", "f32"), ("plain", "q8_0")])
def test_selecting_every_visible_cell_is_the_full_path(models, name, cache):
    # f32 weights and cache: the selected path differs from the full one only in the order of the
    # softmax sum (measured max error 2e-6 on logits of size ~5, f32 and q8_0 K caches); 1e-4 leaves margin while one
    # dropped or misplaced cell, a wrong position in RoPE or a misrouted probability moves the
    # logits by > 0.05 (checked by the small-k test below)
    tokens = prompt(1)
    _, full = decode_steps(models[name], None, tokens, cache)
    _, selected = decode_steps(models[name], ALL_VISIBLE, tokens, cache)
    np.testing.assert_allclose(selected, full, atol=1e-4)


@pytest.mark.parametrize("name", ["plain", "hybrid"])
def test_a_small_selection_changes_decoding_but_not_prompt_processing(models, name):
    tokens = prompt(2)
    prefill_full, full = decode_steps(models[name], None, tokens)
    prefill_few, few = decode_steps(models[name], FEW, tokens)
    np.testing.assert_array_equal(prefill_few, prefill_full)  # batches of > 1 token: untouched
    assert np.isfinite(few).all()
    assert np.abs(few - full).max() > 0.05


def test_invalid_top_k_is_refused(models):
    with top_k_override(-3), pytest.raises(RuntimeError, match="could not load"):
        Session(models["plain"], SessionParams(n_ctx=64))


def test_hybrid_override_and_top_k_compose(models):
    # the plain latent cache of a hybrid file (0/0 override) with selection equals the plain file's
    tokens = prompt(3)
    with hybrid_override(sink_tokens=0, recent_window=0):
        _, a = decode_steps(models["hybrid"], FEW, tokens)
    _, b = decode_steps(models["plain"], FEW, tokens)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_file_s_decode_top_k_is_the_default_and_the_variable_overrides_it(models, monkeypatch):
    # lorc.decode_top_k (convert --decode-top-k) is the runtime's k when LLAMA_LORC_TOP_K is unset;
    # the variable overrides it, 0 included. The file holds the same tensors as "hybrid", so each
    # pair below runs the same graph on the same weights: equal to the bit
    monkeypatch.delenv(TOP_K_ENV, raising=False)
    tokens = prompt(4)
    assert top_k_in_effect(models["hybrid-top-k"]) == FEW and top_k_in_effect(models["hybrid"]) == 0
    with top_k_override(None), Session(models["hybrid-top-k"],
                                       SessionParams(n_ctx=512, cache_type_k="f32", cache_type_v="f32")) as s:
        s.decode_seq(tokens[:PREFILL])
        default = np.stack([s.decode_seq([t], pos0=PREFILL + i)[0] for i, t in enumerate(tokens[PREFILL:])])
    _, few = decode_steps(models["hybrid"], FEW, tokens)
    _, full = decode_steps(models["hybrid"], None, tokens)
    _, overridden = decode_steps(models["hybrid-top-k"], 0, tokens)
    np.testing.assert_array_equal(default, few)
    np.testing.assert_array_equal(overridden, full)
    assert np.abs(default - full).max() > 0.05  # the file's k did select (as in the small-k test)
    with top_k_override(0):
        assert top_k_in_effect(models["hybrid-top-k"]) == 0
