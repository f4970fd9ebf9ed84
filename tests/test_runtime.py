"""The patched runtime runs LoRC GGUFs: numerics of the latent path against the original model
and its dense-equivalent, KV bytes measured from the runtime, sequence operations, state, and
quantization. Every test loads models through llama-cpp-python (the library our build installs).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

import synth
from lorc_gguf import convert, runtime
from lorc_gguf.converter.dense import write_dense_equivalent
from lorc_gguf.evaluation.metrics import mean_kl
from lorc_gguf.format.info import gguf_lorc_version
from lorc_gguf.runtime import patched
from lorc_gguf.runtime.library import silence_llama_logs
from lorc_gguf.runtime.session import Session, SessionParams

llama_cpp = pytest.importorskip("llama_cpp")
silence_llama_logs()

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM = 4, 256, 8, 2, 64
D_KV = N_HEAD_KV * HEAD_DIM  # 128
PLANTED_RANK = 64  # K/V weights of the "exact" model have exactly this rank


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, synth.VOCAB_SIZE - 100, n)]


# Tests of cache bookkeeping (sequences, copies, state, shifts) compare a long prompt with its
# continuation in shorter ubatches. With an f16 cache the runtime takes different roads for the
# two (a prompt ubatch rebuilds keys and values rounded to f16 as the dense cache stores them, a
# short one attends the latent rows and lifts), which differ by f16 rounding (measured up to 4e-3
# on logits of ~2). f32 caches make both roads float32-exact, so these tests keep tight tolerances.
F32 = dict(cache_type_k="f32", cache_type_v="f32")


def logits_of(path: Path, tokens: list[int], **params) -> np.ndarray:
    with Session(path, SessionParams(n_ctx=256, **params)) as s:
        return s.decode_seq(tokens)


@pytest.fixture(scope="module")
def exact_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic model whose K/V weights have rank 64 of 128, and its LoRC conversion at rank 64:
    the factorization is exact, so the latent model computes the original function."""
    d = tmp_path_factory.mktemp("exact")
    spectrum = list(np.linspace(1.0, 0.5, PLANTED_RANK)) + [0.0] * (D_KV - PLANTED_RANK)
    original = synth.make_llama_gguf(d / "original.gguf", n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD,
                                     n_head_kv=N_HEAD_KV, head_dim=HEAD_DIM, n_ff=512, seed=1,
                                     spectra={"key": [spectrum] * N_LAYER, "value": [spectrum] * N_LAYER})
    lorc = d / "lorc.gguf"
    convert(original, lorc, ranks=[PLANTED_RANK] * (2 * N_LAYER), outtype="f32", progress=False, data_free=True)
    return original, lorc


def dense_and_lorc(d: Path, seed: int, ratio: float) -> tuple[Path, Path]:
    """A random synthetic model converted at uniform ``ratio``, and its dense-equivalent (A*B written back)."""
    original = synth.make_llama_gguf(d / "original.gguf", n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD,
                                     n_head_kv=N_HEAD_KV, head_dim=HEAD_DIM, n_ff=512, seed=seed)
    lorc = d / "lorc.gguf"
    convert(original, lorc, allocation="uniform", ratio=ratio, outtype="f32", progress=False, data_free=True)
    return write_dense_equivalent(lorc, d / "dense.gguf"), lorc


@pytest.fixture(scope="module")
def reduced_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Half KV width: value rank 64 = head width."""
    return dense_and_lorc(tmp_path_factory.mktemp("reduced"), seed=2, ratio=0.5)


def test_installed_library_is_patched():
    assert runtime.runtime_format_version() == 1


def test_unpatched_library_gets_a_clear_message(monkeypatch, exact_pair):
    # where load() looks it up (lorc_gguf.runtime re-exports it)
    monkeypatch.setattr(patched, "runtime_format_version", lambda: 0)
    with pytest.raises(runtime.RuntimeNotPatched, match="build_runtime.py"):
        runtime.load(exact_pair[1])


def test_lorc_file_loads_with_the_plain_llama_class(exact_pair):
    llm = llama_cpp.Llama(model_path=str(exact_pair[1]), n_ctx=128, verbose=False)
    assert llm.metadata["lorc.version"] == "1"
    out = llm.create_completion("Hello", max_tokens=4, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


# f16 cache noise floor: the *same* original model with an f16 vs an f32 cache. An exact
# factorization may only add noise of that order; 4x leaves room for the extra rounding of the
# latent (the cache stores the f16 latent instead of the f16 k/v) without hiding a real error —
# a wrong head mapping, position or mask gives a KL of order 0.1-1 on these models.
@pytest.mark.parametrize("flash_attn", [False, True])
def test_exact_factorization_matches_original(exact_pair, flash_attn):
    original, lorc = exact_pair
    tokens = prompt(96)
    ref32 = logits_of(original, tokens, flash_attn=flash_attn, cache_type_k="f32", cache_type_v="f32")
    ref16 = logits_of(original, tokens, flash_attn=flash_attn)
    got = logits_of(lorc, tokens, flash_attn=flash_attn)
    floor = mean_kl(ref32, ref16)
    assert mean_kl(ref32, got) <= 4 * floor + 1e-6
    assert np.mean(ref32.argmax(-1) == got.argmax(-1)) >= 0.95


def test_exact_factorization_f32_cache_is_exact(exact_pair):
    # with f32 weights, cache and no flash attention only float32 reassociation remains:
    # (up @ down) x vs up @ (down x) and RoPE applied at read time
    original, lorc = exact_pair
    tokens = prompt(64)
    a = logits_of(original, tokens, cache_type_k="f32", cache_type_v="f32")
    b = logits_of(lorc, tokens, cache_type_k="f32", cache_type_v="f32")
    np.testing.assert_allclose(b, a, atol=2e-3 * np.abs(a).max())


@pytest.mark.parametrize("flash_attn,cache", [(False, "f16"), (True, "f16"), (True, "q8_0")])
def test_reduced_rank_matches_dense_equivalent(reduced_pair, flash_attn, cache):
    dense, lorc = reduced_pair
    tokens = prompt(96, seed=3)
    ref = logits_of(dense, tokens, flash_attn=flash_attn, cache_type_k="f32", cache_type_v="f32")
    floor = mean_kl(ref, logits_of(dense, tokens, flash_attn=flash_attn, cache_type_k=cache, cache_type_v=cache))
    got = logits_of(lorc, tokens, flash_attn=flash_attn, cache_type_k=cache, cache_type_v=cache)
    # same justification as above; q8_0 rounds latent and dense rows differently, hence the floor
    # is taken with the same cache type
    assert mean_kl(ref, got) <= 4 * floor + 1e-6


def values_rebuilt(n_kv: int, n_tokens: int, rank: int) -> bool:
    """The runtime's rule (llm_graph_context::build_lorc_values): a ubatch rebuilds latent values
    before attention when that takes fewer multiply-adds than attending at the rank width and
    lifting each head's output afterwards."""
    latent = n_kv * n_tokens * N_HEAD * rank + n_tokens * N_HEAD * rank * HEAD_DIM
    rebuilt = n_kv * rank * D_KV + n_kv * n_tokens * N_HEAD * HEAD_DIM
    return rebuilt < latent


@pytest.fixture(scope="module")
def wide_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Value rank 96 > head width 64: prompt ubatches take the rebuilt-values path."""
    return dense_and_lorc(tmp_path_factory.mktemp("wide"), seed=6, ratio=0.75)


@pytest.mark.parametrize("cache", ["f32", "f16"])
def test_prompt_with_rebuilt_values_matches_dense_equivalent(wide_pair, cache):
    dense, lorc = wide_pair
    tokens = prompt(96, seed=5)
    # the prompt's ubatch rebuilds values for any cache view the runtime may pick (n_kv from the
    # prompt length up to the padded context); single-token steps lift them instead
    assert all(values_rebuilt(n_kv, len(tokens), 96) for n_kv in (len(tokens), 256))
    assert not values_rebuilt(256, 1, 96)
    params = dict(cache_type_k=cache, cache_type_v=cache)
    with Session(lorc, SessionParams(n_ctx=256, **params)) as s:
        got = s.decode_seq(tokens)
        s.clear()
        s.decode_seq(tokens[:80], logits=False)
        steps = np.stack([s.decode_seq([t], pos0=80 + i)[0] for i, t in enumerate(tokens[80:])])
    ref = logits_of(dense, tokens, **F32)
    if cache == "f32":
        # float32 reassociation only, as in test_exact_factorization_f32_cache_is_exact; values
        # read through the wrong layout or head move logits by more than 0.1 of the range
        np.testing.assert_allclose(got, ref, atol=2e-3 * np.abs(ref).max())
        np.testing.assert_allclose(steps, got[80:], atol=2e-3 * np.abs(ref).max())
    else:
        # rebuilt keys and values are rounded to f16 as the dense cache stores its rows: the
        # dense-equivalent's own f16-cache KL is the floor, as in the tests above
        floor = mean_kl(ref, logits_of(dense, tokens, **params))
        assert mean_kl(ref, got) <= 4 * floor + 1e-6
        assert mean_kl(ref[80:], steps) <= 4 * floor + 1e-6


def test_kv_bytes_per_token_follow_the_ranks(reduced_pair):
    dense, lorc = reduced_pair
    tokens = prompt(64, seed=4)
    per_cell = 12  # llama.cpp serializes pos, n_seq_id and one seq_id (int32 each) per cell
    sizes = {}
    for name, path in (("dense", dense), ("lorc", lorc)):
        for cache in ("f16", "q8_0"):
            with Session(path, SessionParams(n_ctx=256, flash_attn=True, cache_type_k=cache, cache_type_v=cache)) as s:
                sizes[name, cache] = s.kv_bytes_per_token(tokens) - per_cell
    assert sizes["dense", "f16"] == N_LAYER * 2 * D_KV * 2
    assert sizes["lorc", "f16"] == pytest.approx(0.5 * sizes["dense", "f16"])
    # q8_0 rows: 34 bytes per 32 values
    assert sizes["lorc", "q8_0"] == pytest.approx(0.5 * sizes["dense", "f16"] * 34 / 64)


@pytest.mark.parametrize("which,kv_unified", [("lorc", False), ("lorc", True), ("dense", False)])
def test_multiple_sequences_in_one_batch(reduced_pair, which, kv_unified):
    """Two sequences in one ubatch. Without flash attention V is cached transposed, written through
    element-major v_idxs (the runtime's transposed latent values): a unified cache (one stream)
    takes the transposed latent layout, per-sequence streams the untransposed one, and a dense
    model's streams still land where they should."""
    dense, lorc = reduced_pair
    a, b = prompt(40, seed=5), prompt(40, seed=6)
    params = SessionParams(n_ctx=256, n_seq_max=2, kv_unified=kv_unified, **F32)
    with Session(lorc if which == "lorc" else dense, params) as s:
        both = s.decode([(t, i, 0) for i, t in enumerate(a)] + [(t, i, 1) for i, t in enumerate(b)])
        s.clear()
        alone_a = s.decode_seq(a)
        s.clear()
        alone_b = s.decode_seq(b)
    np.testing.assert_allclose(both[:40], alone_a, atol=1e-4)
    np.testing.assert_allclose(both[40:], alone_b, atol=1e-4)


def test_seq_cp_keep_rm_and_state_roundtrip(reduced_pair):
    _, lorc = reduced_pair
    tokens = prompt(70, seed=7)
    with Session(lorc, SessionParams(n_ctx=256, n_seq_max=2, **F32)) as s:
        ref = s.decode_seq(tokens)[-10:]
        s.clear()
        s.decode_seq(tokens[:60], logits=False)
        s.seq_cp(0, 1)
        s.seq_keep(1)
        via_copy = s.decode_seq(tokens[60:], pos0=60, seq_id=1)

        s.clear()
        s.decode_seq(tokens[:60], logits=False)
        state = s.seq_state(0)
        s.clear()
        s.set_seq_state(state, 1)
        via_state = s.decode_seq(tokens[60:], pos0=60, seq_id=1)

        s.clear()
        s.decode_seq(tokens[:60] + prompt(5, seed=8), logits=False)
        assert s.seq_rm(0, 60, -1)
        via_rm = s.decode_seq(tokens[60:], pos0=60)
    for got in (via_copy, via_state, via_rm):
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_uniform_shift_is_exact(reduced_pair):
    # RoPE is relative: moving every cached position by +d leaves attention unchanged. Latent keys
    # are roped at read, so a shift only moves positions and the result is exact.
    _, lorc = reduced_pair
    tokens = prompt(70, seed=9)
    with Session(lorc, SessionParams(n_ctx=256, **F32)) as s:
        ref = s.decode_seq(tokens)[-10:]
        s.clear()
        s.decode_seq(tokens[:60], logits=False)
        s.seq_add(0, 0, -1, 7)
        got = s.decode_seq(tokens[60:], pos0=67)
    # float32 sin/cos of other absolute angles round differently (~1e-7 relative), which the
    # layers amplify to ~2e-4 on logits of size ~3; a wrong position shifts logits by >0.1
    np.testing.assert_allclose(got, ref, atol=1e-3)


@pytest.mark.parametrize("flash_attn", [False, True])
def test_context_shift_matches_dense_equivalent(reduced_pair, flash_attn):
    # the llama.cpp context shift (drop cells, move the rest back) on the latent model against the
    # same operations on the dense-equivalent; the dense path re-ropes f16 keys in place, the
    # latent path ropes fresh ones, so the two agree to the f16 cache floor
    dense, lorc = reduced_pair
    tokens = prompt(90, seed=10)
    outs = {}
    for name, path in (("dense", dense), ("lorc", lorc)):
        with Session(path, SessionParams(n_ctx=256, flash_attn=flash_attn)) as s:
            s.decode_seq(tokens[:70], logits=False)
            s.seq_rm(0, 4, 34)
            s.seq_add(0, 34, -1, -30)
            outs[name] = s.decode_seq(tokens[70:], pos0=40)
    ref32 = logits_of(dense, tokens[:4] + tokens[34:], flash_attn=flash_attn)[-20:]
    floor = max(mean_kl(ref32, outs["dense"]), 1e-4)
    assert mean_kl(outs["dense"], outs["lorc"]) <= 2 * floor


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q4_K_M"])
def test_quantized_lorc_model_keeps_its_latent_cache(reduced_pair, tmp_path, ftype):
    dense, lorc = reduced_pair
    out = tmp_path / f"lorc-{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(lorc).encode(), str(out).encode(), ctypes.byref(params)) == 0
    assert gguf_lorc_version(out) == 1
    tokens = prompt(64, seed=11)
    with Session(out, SessionParams(n_ctx=256)) as s, Session(lorc, SessionParams(n_ctx=256)) as ref:
        assert s.kv_bytes_per_token(tokens) == ref.kv_bytes_per_token(tokens)
        got, want = s.decode_seq(tokens), ref.decode_seq(tokens)
    # weight quantization perturbs the function, it must not replace it: the logits stay finite
    # and strongly correlated with the unquantized model's (random weights give flat
    # distributions, so argmax agreement would be a poor criterion here)
    assert np.isfinite(got).all()
    corr = np.corrcoef(got.ravel(), want.ravel())[0, 1]
    print(f"{ftype}: logit correlation with the f32 LoRC model {corr:.4f}")
    assert corr > {"Q8_0": 0.99, "Q4_0": 0.8, "Q4_K_M": 0.8}[ftype]
