"""Selective reconstruction of latent keys (the runtime's lorc_top_k context parameter): a decoded token
rebuilds only the k latent cells that score best in latent space. With k at least the number of
visible cells it must give the full path's logits (only summation order changes); with a small k
it must change them; prompt processing must not be affected at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import synth
from lorc_gguf import convert
from lorc_gguf.format.info import top_k_in_effect
from lorc_gguf.runtime.library import silence_llama_logs
from lorc_gguf.runtime.session import Session, SessionParams

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


def decode_steps(path: Path, k: int | None, tokens: list[int], cache: str = "f32",
                 **settings) -> tuple[np.ndarray, np.ndarray]:
    """(prefill logits, one logits row per single-token decode step); k None: every key rebuilt"""
    params = SessionParams(n_ctx=512, cache_type_k=cache, cache_type_v="f32", lorc_top_k=k or 0, **settings)
    with Session(path, params) as s:
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
    # -1 is the file's default; any other negative count is refused when the context is created
    with pytest.raises(RuntimeError, match="could not create a context"):
        Session(models["plain"], SessionParams(n_ctx=64, lorc_top_k=-3))


def test_exact_window_settings_and_top_k_compose(models):
    # the plain latent cache of a hybrid file (0/0 settings) with selection equals the plain file's
    tokens = prompt(3)
    _, a = decode_steps(models["hybrid"], FEW, tokens, lorc_sink_tokens=0, lorc_recent_window=0)
    _, b = decode_steps(models["plain"], FEW, tokens)
    np.testing.assert_allclose(a, b, atol=1e-5)


def file_default_steps(path: Path, tokens: list[int]) -> np.ndarray:
    with Session(path, SessionParams(n_ctx=512, cache_type_k="f32", cache_type_v="f32")) as s:
        s.decode_seq(tokens[:PREFILL])
        return np.stack([s.decode_seq([t], pos0=PREFILL + i)[0] for i, t in enumerate(tokens[PREFILL:])])


def test_the_file_s_decode_top_k_is_the_default_and_the_context_parameter_overrides_it(models):
    # lorc.decode_top_k (convert --decode-top-k) is the runtime's k when lorc_top_k is -1 (None);
    # the parameter overrides it, 0 included. The file holds the same tensors as "hybrid", so each
    # pair below runs the same graph on the same weights: equal to the bit
    tokens = prompt(4)
    assert top_k_in_effect(models["hybrid-top-k"]) == FEW and top_k_in_effect(models["hybrid"]) == 0
    default = file_default_steps(models["hybrid-top-k"], tokens)
    _, few = decode_steps(models["hybrid"], FEW, tokens)
    _, full = decode_steps(models["hybrid"], None, tokens)
    _, overridden = decode_steps(models["hybrid-top-k"], 0, tokens)
    np.testing.assert_array_equal(default, few)
    np.testing.assert_array_equal(overridden, full)
    assert np.abs(default - full).max() > 0.05  # the file's k did select (as in the small-k test)
    assert top_k_in_effect(models["hybrid-top-k"], 0) == 0


def llama_steps(path: Path, tokens: list[int], **kwargs) -> np.ndarray:
    """Decode steps through the bindings' high-level llama_cpp.Llama, LoRC settings as keyword arguments."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512, type_k=0, type_v=0,
                          logits_all=True, verbose=False, **kwargs)
    try:
        llm.eval(tokens[:PREFILL])
        rows = []
        for t in tokens[PREFILL:]:
            llm.eval([t])
            rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
        return np.stack(rows)
    finally:
        llm.close()


def test_llama_keyword_arguments_set_the_runtime(models):
    # Llama(..., lorc_top_k=..., lorc_recent_window=...) reach the runtime: the same logits as the
    # Session with the same context parameters, and different from the file's defaults
    tokens = prompt(5)
    default = llama_steps(models["hybrid-top-k"], tokens)
    np.testing.assert_allclose(default, file_default_steps(models["hybrid-top-k"], tokens), atol=1e-5)
    every_key = llama_steps(models["hybrid-top-k"], tokens, lorc_top_k=0)
    _, full = decode_steps(models["hybrid-top-k"], 0, tokens)
    np.testing.assert_allclose(every_key, full, atol=1e-5)
    assert np.abs(every_key - default).max() > 0.05
    wide = llama_steps(models["hybrid-top-k"], tokens, lorc_top_k=0, lorc_recent_window=256)
    _, wide_session = decode_steps(models["hybrid-top-k"], 0, tokens, lorc_recent_window=256)
    np.testing.assert_allclose(wide, wide_session, atol=1e-5)
    assert np.abs(wide - every_key).max() > 0.05
