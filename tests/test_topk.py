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
    mixed = d / "mixed.gguf"
    convert(original, plain, allocation="uniform", ratio=0.5, outtype="f32", progress=False, data_free=True)
    # layer 1 keeps its values whole (rank = width 128) under latent keys, as a progressive file's
    # widest layers do: where the rest is attended the other layers read every latent value through
    # one product, and layer 1 its whole values through the same (see test_each_sequence_...)
    convert(original, mixed, ranks=[64, 64, 64, 128, 64, 64], outtype="f32", progress=False, data_free=True,
            sink_tokens=4, recent_window=8, decode_top_k=0)
    convert(original, hybrid, allocation="uniform", ratio=0.5, outtype="f32", progress=False, data_free=True,
            sink_tokens=4, recent_window=8, decode_top_k=0)
    convert(original, hybrid_top_k, allocation="uniform", ratio=0.5, outtype="f32", progress=False, data_free=True,
            sink_tokens=4, recent_window=8, decode_top_k=FEW)
    return {"plain": plain, "hybrid": hybrid, "hybrid-top-k": hybrid_top_k, "mixed": mixed}


def prompt(seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, synth.VOCAB_SIZE - 100, PREFILL + STEPS)]


def decode_steps(path: Path, k: int | None, tokens: list[int], cache: str = "f32", cache_v: str = "f32",
                 **settings) -> tuple[np.ndarray, np.ndarray]:
    """(prefill logits, one logits row per single-token decode step); k None: every key rebuilt"""
    params = SessionParams(n_ctx=512, cache_type_k=cache, cache_type_v=cache_v, lorc_top_k=k or 0, **settings)
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


def test_a_bf16_latent_cache_decodes_with_the_rest_attended(models):
    # bf16 latent keys and values: the rest's product then multiplies bf16 rows (ggml_mul_mat of the
    # transposed bf16 cache against the weights rounded to bf16). Against the f32 cache's logits (size
    # ~5) the bf16 roundings (8 significant bits) measured a mean |difference| of 0.023 (0.004-0.2 per
    # step); the rest left out measured 0.82 on either cache (earlier, with ggml_out_prod of
    # untransposed bf16 rows: 0.024, with 1.2 in the one step whose selection the roundings changed).
    # 0.1 lies 4x above the first and 8x below the second
    tokens = prompt(6)
    _, f32 = decode_steps(models["hybrid"], FEW, tokens)
    _, bf16 = decode_steps(models["hybrid"], FEW, tokens, "bf16", "bf16")
    assert np.isfinite(bf16).all()
    assert np.abs(bf16 - f32).mean() < 0.1


def test_invalid_top_k_is_refused(models):
    # -1 is the file's default; any other negative count is refused when the context is created
    with pytest.raises(RuntimeError, match="could not create a context"):
        Session(models["plain"], SessionParams(n_ctx=64, lorc_top_k=-3))


def test_attend_rest_overrides_the_default_rule(models):
    # by default (-1) every layer with latent values attends the latent cells a decoded token does not
    # rebuild: 1 runs the same graph (equal to the bit) and 0 leaves them out, which moves the logits
    # as much as a small selection does
    tokens = prompt(5)
    _, auto = decode_steps(models["plain"], FEW, tokens)
    _, on = decode_steps(models["plain"], FEW, tokens, lorc_attend_rest=1)
    _, off = decode_steps(models["plain"], FEW, tokens, lorc_attend_rest=0)
    np.testing.assert_array_equal(on, auto)
    assert np.isfinite(off).all()
    assert np.abs(off - auto).max() > 0.05
    with pytest.raises(RuntimeError, match="could not create a context"):
        Session(models["plain"], SessionParams(n_ctx=64, lorc_attend_rest=2))


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


# --- several sequences decoding together (a server's parallel slots) --------------------------------

LENGTHS = (PREFILL, PREFILL - 7, PREFILL - 15)  # prompts of different lengths: different positions per sequence


def parallel_steps(path: Path, k: int | None, prompts: list[list[int]], unified: bool, **settings) -> np.ndarray:
    """Each sequence's prompt decoded on its own, then STEPS batches of one token per sequence;
    returns [STEPS, n_seq, n_vocab]. Unified: one cache shared by every sequence (llama-server's
    default); else one stream per sequence, each of 512 cells as in decode_steps."""
    n = len(prompts)
    params = SessionParams(n_ctx=512 * n, n_seq_max=n, kv_unified=unified, cache_type_k="f32", cache_type_v="f32",
                           lorc_top_k=k or 0, **settings)
    with Session(path, params) as s:
        for seq, (tokens, length) in enumerate(zip(prompts, LENGTHS)):
            s.decode_seq(tokens[:length], seq_id=seq, logits=False)
        return np.stack([s.decode([(tokens[length + j], length + j, seq)
                                   for seq, (tokens, length) in enumerate(zip(prompts, LENGTHS))])
                         for j in range(STEPS)])


def alone_steps(path: Path, k: int | None, prompts: list[list[int]], **settings) -> np.ndarray:
    """The same decoding, each sequence alone in a context of its own: [STEPS, n_seq, n_vocab]"""
    rows = []
    for tokens, length in zip(prompts, LENGTHS):
        params = SessionParams(n_ctx=512, cache_type_k="f32", cache_type_v="f32", lorc_top_k=k or 0, **settings)
        with Session(path, params) as s:
            s.decode_seq(tokens[:length], logits=False)
            rows.append(np.stack([s.decode_seq([tokens[length + j]], pos0=length + j)[0] for j in range(STEPS)]))
    return np.stack(rows, axis=1)


@pytest.mark.parametrize("unified,flash_attn", [(False, False), (True, False), (True, True)],
                         ids=["streams", "unified", "unified-fa"])
@pytest.mark.parametrize("name", ["plain", "hybrid", "mixed"])
def test_each_sequence_of_a_batch_selects_its_own_cells(models, name, unified, flash_attn):
    # A batch of one decoded token per sequence selects per token: with a small k each sequence's
    # logits are those of the same sequence decoded alone with that k (not the full rebuild's), and
    # with k at least the visible cells they are the full path's. f32 weights and cache; the batch
    # differs from the lone runs only in summation order (measured max 3.5e-6 on logits of size ~5,
    # as the full rebuild's batch against its lone runs); a cell of another sequence selected or a
    # wrong position moves them by > 0.05 (the runtime that rebuilt every key in such batches failed
    # the first assert by > 5). Flash attention: the masks are f16. A unified cache: the score turns
    # the query back to the position of each bucket's middle cell, and a bucket of a unified cache
    # holds cells of several sequences, so a token's scores there depend on the others' positions
    # and its selection can differ from its sequence decoded alone (measured: up to 6 on these
    # logits); only one stream per sequence must match the lone runs. Without flash attention a
    # lone sequence's cache keeps its values transposed (the rest's product is a ggml_mul_mat over
    # every cell, and the mixed file's whole-value layer takes its selection's weights through the
    # same product) and one stream per sequence untransposed (ggml_out_prod, and row gathers): the
    # first assert also holds the two layouts to the same logits
    prompts = [prompt(10 + i) for i in range(len(LENGTHS))]
    few = parallel_steps(models[name], FEW, prompts, unified, flash_attn=flash_attn)
    assert np.isfinite(few).all()
    if not unified:
        np.testing.assert_allclose(few, alone_steps(models[name], FEW, prompts, flash_attn=flash_attn), atol=1e-4)
    full = parallel_steps(models[name], None, prompts, unified, flash_attn=flash_attn)
    every_visible = parallel_steps(models[name], ALL_VISIBLE, prompts, unified, flash_attn=flash_attn)
    # flash attention's full path takes the rebuilt keys as f16 (its kernel's K type): 0.01 from the
    # selected path's f32 keys, measured; the f32 paths agree to summation order
    np.testing.assert_allclose(every_visible, full, atol=0.05 if flash_attn else 1e-4)
    assert np.abs(few - full).max() > 0.05
