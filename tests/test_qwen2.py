"""qwen2 end to end: a random Qwen2ForCausalLM (Q/K/V biases, NEOX RoPE, untied output) saved by
transformers, turned into a GGUF by the pinned llama.cpp's own converter, factorized by LoRC and run
by the patched runtime. The latent path must compute what its dense-equivalent computes, and the
hybrid cache must follow the reference rule with the biases in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import reference
import synth
from lorc_gguf import convert
from lorc_gguf.converter.dense import write_dense_equivalent
from lorc_gguf.converter.hf import convert_folder
from lorc_gguf.evaluation.metrics import mean_kl
from lorc_gguf.format.read import FastGGUFReader
from lorc_gguf.runtime.library import silence_llama_logs
from lorc_gguf.runtime.session import Session, SessionParams

pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")
silence_llama_logs()

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM = 2, 128, 4, 2, 32
D_KV = N_HEAD_KV * HEAD_DIM  # 64
SINKS, WINDOW = 4, 16


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, synth.VOCAB_SIZE - 100, n)]


def logits_of(path: Path, tokens: list[int], **params) -> np.ndarray:
    with Session(path, SessionParams(n_ctx=128, n_batch=128, n_ubatch=128, **params)) as s:
        return s.decode_seq(tokens)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("qwen2")
    folder = synth.make_hf_qwen2_folder(d / "hf", n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD,
                                        n_head_kv=N_HEAD_KV, n_ff=256, seed=4)
    original = convert_folder(folder, d / "original.gguf")  # the official converter (f16 weights)
    lorc = d / "lorc.gguf"
    convert(original, lorc, allocation="uniform", ratio=0.5, outtype="f32", progress=False, data_free=True,
            sink_tokens=SINKS, recent_window=WINDOW)
    return {"original": original, "lorc": lorc, "dense": write_dense_equivalent(lorc, d / "dense.gguf")}


def test_the_file_is_qwen2_with_biases(models) -> None:
    r = FastGGUFReader(models["lorc"])
    assert r.fields["general.architecture"].contents() == "qwen2"
    assert r.fields["qwen2.attention.lorc_key_rank"].contents() == [D_KV // 2] * N_LAYER
    names = {t.name: t for t in r.tensors}
    for il in range(N_LAYER):
        for side in ("k", "v"):
            bias = np.asarray(names[f"blk.{il}.attn_{side}.bias"].data)
            assert np.abs(bias).max() > 0.1  # random biases made it through the official converter
            assert f"blk.{il}.attn_{side}_down.weight" in names and f"blk.{il}.attn_{side}_up.weight" in names
    assert "output.weight" in names  # untied


def test_numpy_reference_reproduces_the_runtime_on_the_original(models) -> None:
    """The reference forward (NEOX RoPE, biases) is trusted only because it reproduces llama.cpp
    on the unmodified model; f32 cache so that only accumulation order differs."""
    tokens = prompt(48, seed=1)
    got = logits_of(models["original"], tokens, cache_type_k="f32", cache_type_v="f32")
    ref = reference.forward(models["original"], tokens)
    # float32 accumulation over a 128-wide model: 1e-3 of the logit range is far below any
    # modelling difference (dropping a bias or misplacing RoPE moves logits by O(1))
    np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("flash_attn", [False, True])
def test_latent_matches_dense_equivalent(models, flash_attn: bool) -> None:
    tokens = prompt(96, seed=2)
    ref = logits_of(models["dense"], tokens, flash_attn=flash_attn, cache_type_k="f32", cache_type_v="f32")
    floor = mean_kl(ref, logits_of(models["dense"], tokens, flash_attn=flash_attn))
    got = logits_of(models["lorc"], tokens, flash_attn=flash_attn, lorc_sink_tokens=0, lorc_recent_window=0)
    # the f16 cache rounds latent rows and dense rows differently; the dense model's own f16-vs-f32
    # divergence is the noise floor (same rule as tests/test_runtime.py)
    assert mean_kl(ref, got) <= 4 * floor + 1e-6


def test_hybrid_follows_the_reference_rule_with_biases(models) -> None:
    """Mixed case: the first SINKS and the last WINDOW positions exact, the rest latent, K and V
    biases on both paths (the latent V bias is added after attention in the runtime)."""
    tokens = prompt(64, seed=3)
    got = logits_of(models["lorc"], tokens, cache_type_k="f32", cache_type_v="f32")
    ref = reference.forward(models["original"], tokens, lorc=models["lorc"],
                            exact=lambda p0, p1: p0 < SINKS or p1 - p0 < WINDOW)
    plain = reference.forward(models["original"], tokens, lorc=models["lorc"])
    # the rule matters far more than the tolerance: plain latent differs from the hybrid by O(1)
    assert np.abs(plain - ref).max() > 20 * 1e-3 * np.abs(ref).max()
    np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max())


def test_hybrid_covering_everything_is_the_original(models) -> None:
    tokens = prompt(64, seed=5)
    got = logits_of(models["lorc"], tokens, cache_type_k="f32", cache_type_v="f32", lorc_sink_tokens=0,
                    lorc_recent_window=128)
    ref = logits_of(models["original"], tokens, cache_type_k="f32", cache_type_v="f32")
    np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max())


def test_kv_bytes_are_half(models) -> None:
    tokens = prompt(64, seed=6)
    per_token = {}
    for name in ("original", "lorc"):
        with Session(models[name], SessionParams(n_ctx=128, lorc_sink_tokens=0, lorc_recent_window=0)) as s:
            # minus llama.cpp's per-cell metadata (pos, n_seq_id, one seq_id: int32 each)
            per_token[name] = s.kv_bytes_per_token(tokens) - 12
    assert per_token["original"] == N_LAYER * 2 * D_KV * 2  # f16 K and V rows
    assert per_token["lorc"] == pytest.approx(0.5 * per_token["original"])
