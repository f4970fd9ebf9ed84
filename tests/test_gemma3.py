"""gemma3 end to end: random Gemma3ForCausalLM models (QK-norm with random gains, GELU FFN, NEOX
RoPE with a separate base for local layers) saved by transformers, turned into GGUFs by the pinned
llama.cpp's own converter, factorized by LoRC and run by the patched runtime.

Two variants: the real architecture's five sliding-window layers to one global layer (the iswa
cache: each kind of layer keeps its latent rows in its own half; with the exact sinks and window,
the global layers' latent and exact stores beside a store of the sliding-window layers), and every
layer global (the plain KV cache with or without the exact sinks and window). The latent path must compute what its
dense-equivalent computes: the key norm applied to the rebuilt keys before RoPE, each cell roped
with its position in whichever cache holds it. No real Gemma 3 weights are available offline, so
quality is not measured here."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest

import synth
from lorc_gguf import LorcError, convert
from lorc_gguf import calibration as cal
from lorc_gguf.converter import aware
from lorc_gguf.converter.dense import write_dense_equivalent
from lorc_gguf.converter.hf import convert_folder
from lorc_gguf.evaluation.metrics import mean_kl
from lorc_gguf.format import keys as constants
from lorc_gguf.format.read import FastGGUFReader, open_gguf
from lorc_gguf.format.write import CopiedTensor, copy_metadata, write_gguf
from lorc_gguf.runtime.library import silence_llama_logs
from lorc_gguf.runtime.session import Session, SessionParams

pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")
silence_llama_logs()

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM = 6, 128, 4, 2, 64
D_KV = N_HEAD_KV * HEAD_DIM  # 128
WINDOW_SWA = 16  # the local layers' attention window
SINKS, WINDOW = 4, 16  # hybrid cache of the all-global variant
F32 = {"cache_type_k": "f32", "cache_type_v": "f32"}
HALF = [D_KV // 2] * (2 * N_LAYER)  # every layer's K and V at half width (explicit ranks)
IS_SWA = [il % 6 < 5 for il in range(N_LAYER)]  # llama.cpp's gemma3 pattern: every sixth layer global


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, synth.VOCAB_SIZE - 100, n)]


# the runtime settings that run a file converted for the exact window with the plain latent cache
PLAIN = dict(lorc_sink_tokens=0, lorc_recent_window=0)


def params(**kw) -> SessionParams:
    base = dict(n_ctx=256, n_batch=128, n_ubatch=128)
    base.update(kw)
    return SessionParams(**base)


def logits_of(path: Path, tokens: list[int], **kw) -> np.ndarray:
    with Session(path, params(**kw)) as s:
        return s.decode_seq(tokens)


# float32 caches on both sides: only accumulation order differs (rebuilt keys vs stored keys,
# latent values lifted after attention vs before), but the f16 weights of the converted models
# round the activations they multiply, so a last-bit difference upstream can flip a rounding:
# measured up to 1e-3 of the logit range. A key norm dropped or misapplied, or the plain latent
# path in place of exact cells, moves logits by 0.6 of the range (test_dropping_the_key_norm...).
TOLERANCE = 5e-3


def close(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, atol=TOLERANCE * np.abs(ref).max())


def far(got: np.ndarray, ref: np.ndarray) -> bool:
    return bool(np.abs(got - ref).max() > 20 * TOLERANCE * np.abs(ref).max())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gemma3")
    out: dict[str, Path] = {}
    for variant, window in (("swa", WINDOW_SWA), ("global", None)):
        folder = synth.make_hf_gemma3_folder(d / f"hf-{variant}", n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD,
                                             n_head_kv=N_HEAD_KV, head_dim=HEAD_DIM, n_ff=256,
                                             sliding_window=window, seed=7)
        original = convert_folder(folder, d / f"original-{variant}.gguf")
        lorc = d / f"lorc-{variant}.gguf"
        hybrid = {} if window else {"sink_tokens": SINKS, "recent_window": WINDOW}
        convert(original, lorc, ranks=HALF, outtype="f32", progress=False, data_free=True, **hybrid)
        out[f"original-{variant}"] = original
        out[f"lorc-{variant}"] = lorc
        out[f"dense-{variant}"] = write_dense_equivalent(lorc, d / f"dense-{variant}.gguf")
    # the exact sinks and window with sliding windows: the converter's shape (sliding-window layers
    # dense, the global layer latent), every layer latent, and for the latter's reference the
    # dense equivalent of its sliding-window layers' factors alone (data-free SVD factors depend on
    # the layer's weight only, so they are the same in both files)
    exact = {"sink_tokens": SINKS, "recent_window": WINDOW}
    swa_only = [r for il in range(N_LAYER) for r in ((D_KV // 2,) * 2 if IS_SWA[il] else (D_KV,) * 2)]
    global_only = [r for il in range(N_LAYER) for r in ((D_KV,) * 2 if IS_SWA[il] else (D_KV // 2,) * 2)]
    for name, ranks, extra in (("hybrid-swa", global_only, exact), ("hybrid-swa-latent", HALF, exact),
                               ("lorc-swa-local", swa_only, {})):
        convert(out["original-swa"], d / f"{name}.gguf", ranks=ranks, outtype="f32", progress=False, data_free=True,
                **extra)
        out[name] = d / f"{name}.gguf"
    out["dense-swa-local"] = write_dense_equivalent(out["lorc-swa-local"], d / "dense-swa-local.gguf")
    return out


def test_the_files_are_gemma3_with_every_layer_factorized(models) -> None:
    for variant in ("swa", "global"):
        r = FastGGUFReader(models[f"lorc-{variant}"])
        assert r.fields["general.architecture"].contents() == "gemma3"
        assert r.fields["gemma3.attention.lorc_key_rank"].contents() == [D_KV // 2] * N_LAYER
        assert r.fields["gemma3.attention.lorc_value_rank"].contents() == [D_KV // 2] * N_LAYER
        names = {t.name for t in r.tensors}
        assert all(f"blk.{il}.attn_k_norm.weight" in names for il in range(N_LAYER))
        has_window = "gemma3.attention.sliding_window" in r.fields
        assert has_window == (variant == "swa")


@pytest.mark.parametrize("flash_attn", [False, True])
def test_latent_matches_dense_equivalent_with_sliding_windows(models, flash_attn: bool) -> None:
    """96 tokens against a 16-token window: the local layers' masks cut most of the context, so a
    latent row read from the wrong half of the iswa cache, or roped with the wrong cell position or
    frequency base, shows."""
    tokens = prompt(96, seed=2)
    ref = logits_of(models["dense-swa"], tokens, flash_attn=flash_attn, **F32)
    got = logits_of(models["lorc-swa"], tokens, flash_attn=flash_attn, **F32)
    if not flash_attn:
        # the CPU flash-attention kernel rounds through f16 internally whatever the cache type
        # (measured: 0.15% of the logit range here), so with it only the KL rule below applies
        close(got, ref)
    # f16 caches (the default) round latent rows and dense rows differently; the dense model's
    # own f16-vs-f32 divergence is the noise floor (same rule as tests/test_runtime.py)
    floor = mean_kl(ref, logits_of(models["dense-swa"], tokens, flash_attn=flash_attn))
    assert mean_kl(ref, logits_of(models["lorc-swa"], tokens, flash_attn=flash_attn)) <= 4 * floor + 1e-6


def test_decoding_through_a_recycled_sliding_window_cache(models) -> None:
    """Without swa_full the local layers' cache holds window + ubatch cells (padded to 256), so past
    256 tokens its cells are reused as the window slides: every reused cell must take its new
    position for RoPE, in the local layers' cache while the global layers' cache keeps growing."""
    tokens = prompt(320, seed=3)
    n_prompt = 280
    got, ref = [], []
    for name, out in (("lorc-swa", got), ("dense-swa", ref)):
        with Session(models[name], params(n_ctx=512, n_batch=32, n_ubatch=32, swa_full=False, **F32)) as s:
            assert s.lib.llama_model_n_swa(s.model) == WINDOW_SWA
            out.append(s.decode_seq(tokens[:n_prompt]))
            for i in range(n_prompt, len(tokens)):  # one token per llama_decode, as generation runs
                out.append(s.decode([(tokens[i], i, 0)]))
    close(np.concatenate(got), np.concatenate(ref))


def test_dropping_the_key_norm_is_visible(models, tmp_path) -> None:
    """The tolerance above is meaningful only if a misapplied key norm breaks it: the same latent
    file with unit key-norm gains (the norm still normalizes, only its random gains go) must fail it."""
    tokens = prompt(64, seed=4)
    ref = logits_of(models["dense-swa"], tokens, **F32)
    got = logits_of(_with_unit_key_norm(models["lorc-swa"], tmp_path / "unit-knorm.gguf"), tokens, **F32)
    assert far(got, ref)


def _with_unit_key_norm(src: Path, dst: Path) -> Path:
    r = gguf.GGUFReader(src)
    plan = []
    for t in r.tensors:
        if t.name.endswith("attn_k_norm.weight"):
            ones = np.ones_like(np.asarray(t.data))
            t = SimpleNamespace(name=t.name, data=ones, n_bytes=ones.nbytes, tensor_type=t.tensor_type)
        plan.append(CopiedTensor(t))
    write_gguf(dst, "gemma3", copy_metadata(r), plan, progress=False)
    return dst


def test_all_global_latent_matches_dense_equivalent(models) -> None:
    tokens = prompt(96, seed=5)
    got = logits_of(models["lorc-global"], tokens, **PLAIN, **F32)
    close(got, logits_of(models["dense-global"], tokens, **F32))


def check_exact_window(original: Path, lorc: Path, tokens: list[int]) -> None:
    """A query whose every cell lies in the recent window sees exact keys only (the exact store's
    keys are normed and roped like the dense model's), so the first WINDOW rows equal the original;
    later rows mix both stores and lie between the original and the plain latent path; a window
    covering everything is the original model."""
    ref = logits_of(original, tokens, **F32)
    hybrid = logits_of(lorc, tokens, **F32)
    plain = logits_of(lorc, tokens, **PLAIN, **F32)
    close(hybrid[:WINDOW], ref[:WINDOW])
    assert far(plain[:WINDOW], ref[:WINDOW])
    late = slice(2 * WINDOW, None)
    assert mean_kl(ref[late], hybrid[late]) < mean_kl(ref[late], plain[late])
    close(logits_of(lorc, tokens, lorc_sink_tokens=0, lorc_recent_window=256, **F32), ref)


def test_hybrid_cache_with_qk_norm(models) -> None:
    """Hybrid cache, all-global variant (see check_exact_window)."""
    check_exact_window(models["original-global"], models["lorc-global"], prompt(80, seed=6))


@pytest.mark.parametrize("variant", ["swa", "global"])
def test_kv_bytes_are_half(models, variant: str) -> None:
    tokens = prompt(16, seed=8)  # within the local window: no cell of either cache is pruned
    per_token = {}
    for kind in ("original", "lorc"):
        with Session(models[f"{kind}-{variant}"], params(n_ctx=128, **PLAIN)) as s:
            per_token[kind] = s.kv_bytes_per_token(tokens)
    # minus llama.cpp's per-cell metadata (pos, n_seq_id, one seq_id: int32 each), per cache
    meta = 12 * (2 if variant == "swa" else 1)
    assert per_token["original"] - meta == N_LAYER * 2 * D_KV * 2  # f16 K and V rows
    assert per_token["lorc"] - meta == pytest.approx(0.5 * (per_token["original"] - meta))


def test_hybrid_cache_with_sliding_windows(models) -> None:
    """The exact sinks and window on the global layer, the sliding-window layers dense in a store of
    their own: the same rules as without sliding windows (check_exact_window), the plain latent
    path being the iswa pair's."""
    check_exact_window(models["original-swa"], models["hybrid-swa"], prompt(96, seed=11))


@pytest.mark.parametrize("flash_attn", [False, True])
def test_hybrid_cache_with_latent_sliding_window_layers(models, flash_attn: bool) -> None:
    """Every layer latent: with the exact window covering everything the global layer reads the
    original K/V and the sliding-window layers their latent rows, which is the dense equivalent of
    the sliding-window layers' factors alone (96 tokens: six local windows)."""
    tokens = prompt(96, seed=12)
    wide = dict(lorc_sink_tokens=0, lorc_recent_window=256, flash_attn=flash_attn)
    ref = logits_of(models["dense-swa-local"], tokens, flash_attn=flash_attn, **F32)
    got = logits_of(models["hybrid-swa-latent"], tokens, **wide, **F32)
    if flash_attn:  # the CPU flash-attention kernel rounds through f16 (see above): the KL rule
        floor = mean_kl(ref, logits_of(models["dense-swa-local"], tokens, flash_attn=True))
        assert mean_kl(ref, got) <= 4 * floor + 1e-6
    else:
        close(got, ref)
    # the global layer's latent rows matter: with the file's own window they are read
    assert far(logits_of(models["hybrid-swa-latent"], tokens, **F32), ref)


def test_hybrid_decoding_through_a_recycled_sliding_window_cache(models) -> None:
    """swa_full off: the sliding-window store holds window + ubatch cells (padded to 256) and reuses
    them past 256 tokens while the latent store grows and the exact store keeps sinks and window;
    generation one token per llama_decode must equal the same file with a full-size store."""
    tokens = prompt(320, seed=13)
    n_prompt = 280
    got, ref = [], []
    for swa_full, out in ((False, got), (True, ref)):
        with Session(models["hybrid-swa-latent"], params(n_ctx=512, n_batch=32, n_ubatch=32, swa_full=swa_full,
                                                          **F32)) as s:
            out.append(s.decode_seq(tokens[:n_prompt]))
            for i in range(n_prompt, len(tokens)):
                out.append(s.decode([(tokens[i], i, 0)]))
    close(np.concatenate(got), np.concatenate(ref))


def test_hybrid_cut_needs_the_sliding_window_cells(models) -> None:
    """Cutting a sequence back needs the cells its next query reads in every store: with an exact
    window wide enough to hold everything, only the recycled sliding-window store can refuse."""
    tokens = prompt(300, seed=14)
    small = params(n_ctx=512, n_batch=32, n_ubatch=32, swa_full=False, lorc_recent_window=512, **F32)
    with Session(models["hybrid-swa-latent"], small) as s:
        s.decode_seq(tokens, logits=False)
        assert not s.seq_rm(0, 30, -1)   # positions [14, 30) left the 256-cell sliding-window store
        assert s.seq_pos_max(0) == 299
        assert s.seq_rm(0, 200, -1)      # [184, 200) are still held
        got = s.decode_seq(tokens[200:201], pos0=200)
    with Session(models["hybrid-swa-latent"], small) as s:
        ref = s.decode_seq(tokens[:201])[-1:]
    close(got, ref)


def test_defaults_give_a_sliding_window_model_the_exact_window(models, tmp_path) -> None:
    """The converter's defaults on a sliding-window model: the exact sinks and window, and ranks for
    the global layers only (the ratio is theirs); the sliding-window layers keep dense K/V."""
    notices: list[str] = []
    out = tmp_path / "default.gguf"
    report = convert(models["original-swa"], out, progress=False, calib_tokens=256, log=notices.append)
    assert report["method"] == aware.WHITEN and report["allocation"] == "progressive"
    reader = FastGGUFReader(out)
    assert reader.fields[constants.KEY_SINK_TOKENS].contents() == constants.DEFAULT_SINK_TOKENS
    assert reader.fields[constants.KEY_RECENT_WINDOW].contents() == constants.DEFAULT_RECENT_WINDOW
    # selective reconstruction on by default for a sliding-window model's global layers
    assert reader.fields[constants.KEY_DECODE_TOP_K].contents() == constants.DEFAULT_DECODE_TOP_K_SWA
    key_rank = reader.fields["gemma3.attention.lorc_key_rank"].contents()
    value_rank = reader.fields["gemma3.attention.lorc_value_rank"].contents()
    for il in range(N_LAYER):
        if IS_SWA[il]:
            assert key_rank[il] == value_rank[il] == D_KV
    (g,) = [il for il in range(N_LAYER) if not IS_SWA[il]]
    assert key_rank[g] + value_rank[g] == D_KV  # half of the global layer's K + V width
    assert any("ranks go to its 1 global layers" in n for n in notices)
    # the runtime takes the exact window (it fell back to the plain latent cache before)
    tokens = prompt(40, seed=15)
    assert not np.allclose(logits_of(out, tokens, **F32), logits_of(out, tokens, **PLAIN, **F32))


@pytest.mark.parametrize("variant", ["swa", "global"])
def test_numpy_forward_reproduces_the_runtime(models, variant: str) -> None:
    """The calibration statistics come from calibrate.Gemma3Forward; it is trusted only because it
    reproduces llama.cpp on the unmodified model (query/key norms, window masks, two RoPE bases,
    post-norms, GELU). 96 tokens span six local windows."""
    tokens = prompt(96, seed=9)
    fwd = cal.numpy_forward(open_gguf(models[f"original-{variant}"]))
    ours = fwd.logits(fwd.run(np.asarray([tokens])))[0]
    theirs = logits_of(models[f"original-{variant}"], tokens, **F32)
    # f32 everywhere on our side; llama.cpp rounds activations to f16 for the f16 weights, which
    # the rule of tests/test_calibrate.py (2e-3 of the logit range) absorbs
    assert np.abs(ours - theirs).max() < 2e-3 * np.abs(theirs).max()
    if variant == "swa":  # the window matters: a forward without it is far off
        fwd.is_swa = [False] * N_LAYER
        blind = fwd.logits(fwd.run(np.asarray([tokens])))[0]
        assert np.abs(blind - theirs).max() > 0.1 * np.abs(theirs).max()


def test_calibrated_conversion(models, tmp_path) -> None:
    """Activation-aware factors for gemma3: statistics from the numpy forward on the built-in text,
    whitened factorization, sensitivity ranks; the file runs and its latent path still equals its
    dense equivalent."""
    out = tmp_path / "calibrated.gguf"
    report = convert(models["original-swa"], out, allocation="sensitivity", ratio=0.5, outtype="f32",
                     progress=False, calibration="builtin", calib_tokens=512)
    assert report["method"] == aware.WHITEN and report["calibration"]["n_tokens"] >= 256
    tokens = prompt(64, seed=10)
    dense = write_dense_equivalent(out, tmp_path / "calibrated-dense.gguf")
    close(logits_of(out, tokens, **PLAIN, **F32), logits_of(dense, tokens, **F32))


def decode_steps(path: Path, tokens: list[int], n_prompt: int, **kw) -> np.ndarray:
    """The logits of tokens[n_prompt:] decoded one token per llama_decode, as generation runs"""
    with Session(path, params(n_ctx=512, **kw)) as s:
        s.decode_seq(tokens[:n_prompt], logits=False)
        return np.concatenate([s.decode([(tokens[i], i, 0)]) for i in range(n_prompt, len(tokens))])


@pytest.mark.parametrize("name,settings", [("lorc-global", PLAIN), ("hybrid-swa", {}), ("hybrid-swa-latent", {})])
def test_selective_reconstruction_with_qk_norm(models, name: str, settings: dict) -> None:
    """Selective reconstruction runs on QK-norm models (its latent score needs the key norm: latent
    rows are stored at unit key rms and the query takes the norm's gain). Selecting every visible cell
    is the full path; a few cells change decoding. n_ctx 512 pads the attended cells to 256, so
    k = 200 runs the selection path over more cells than the 72 visible ones."""
    tokens = prompt(72, seed=16)
    full = decode_steps(models[name], tokens, 48, lorc_top_k=0, **settings, **F32)
    close(decode_steps(models[name], tokens, 48, lorc_top_k=200, **settings, **F32), full)
    assert far(decode_steps(models[name], tokens, 48, lorc_top_k=4, **settings, **F32), full)
