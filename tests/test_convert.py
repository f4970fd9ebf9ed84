"""End-to-end conversion: the embedded SmolLM2 and synthetic llama GGUFs."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import synth

from lorc_gguf import convert
from lorc_gguf.format import keys as constants
from lorc_gguf.format.keys import report_path
from lorc_gguf.format.read import FastGGUFReader

QT = gguf.GGMLQuantizationType
F32_UNIT_ROUNDOFF = 2.0 ** -24
REPO_ROOT = Path(__file__).resolve().parent.parent


def tensors_by_name(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


def field(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def dequantized(t: gguf.ReaderTensor) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "convert.py"), *args],
                          capture_output=True, text=True, cwd=REPO_ROOT)


# --- SmolLM2-135M (Q4_1), converted once through the CLI -----------------------------------------

@pytest.fixture(scope="module")
def smollm2_lorc(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """The paper's method (--data-free) on SmolLM2: these tests pin its factors and ranks."""
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-lorc.gguf"
    proc = run_cli(str(smollm2_path), str(out), "--data-free", "--progressive", "--ratio", "0.5", "--outtype", "f32",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.fixture(scope="module")
def smollm2_readers(smollm2_path: Path, smollm2_lorc):
    # the output through the stock reader, not ours: it must be a GGUF any gguf-py user can open
    # (the input through ours, which test_fast_reader_matches_the_stock_reader pins to the stock one)
    return FastGGUFReader(smollm2_path), gguf.GGUFReader(smollm2_lorc[0])


def test_smollm2_progressive_half_width(smollm2_lorc, smollm2_readers) -> None:
    out, proc = smollm2_lorc
    assert "notice: K/V weights are quantized (Q4_1)" in proc.stderr
    assert "KV width kept" in proc.stdout
    report = json.loads(report_path(out).read_text())
    assert report["totals"]["kv_width_fraction"] == pytest.approx(0.5, abs=0.03)
    assert report["allocation"] == "progressive" and report["n_layer"] == 30
    _, lorc = smollm2_readers
    assert field(lorc, constants.KEY_VERSION) == constants.LORC_FORMAT_VERSION
    assert field(lorc, constants.KEY_ALLOCATION) == "progressive"
    assert field(lorc, constants.KEY_METHOD) == "svd"
    assert field(lorc, constants.KEY_SINK_TOKENS) == 0 and field(lorc, constants.KEY_RECENT_WINDOW) == 0
    assert field(lorc, constants.KEY_DECODE_TOP_K) == 0
    key_rank = field(lorc, constants.key_rank_key("llama"))
    value_rank = field(lorc, constants.value_rank_key("llama"))
    assert key_rank == report["key_rank"] and value_rank == report["value_rank"]
    assert lorc.fields[constants.key_rank_key("llama")].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
    kept = (sum(key_rank) + sum(value_rank)) / (2 * 30 * 192)
    assert kept == pytest.approx(0.5, abs=0.03)
    # the paper's ordering on a real model: larger cumulative condition never gets less rank
    for side, ranks in (("k", key_rank), ("v", value_rank)):
        cum = [row[f"cum_log_kappa_{side}"] for row in report["layers"]]
        for i in range(30):
            for j in range(30):
                if cum[i] > cum[j]:
                    assert ranks[i] >= ranks[j]


def test_smollm2_metadata_and_other_tensors_unchanged(smollm2_readers) -> None:
    src, lorc = smollm2_readers
    for key, f in src.fields.items():
        if key.startswith("GGUF."):
            continue
        assert lorc.fields[key].types == f.types, key
        assert lorc.fields[key].contents() == f.contents(), key
    src_t, out_t = tensors_by_name(src), tensors_by_name(lorc)
    key_rank = field(lorc, constants.key_rank_key("llama"))
    value_rank = field(lorc, constants.value_rank_key("llama"))
    factorized = {constants.TENSOR_K.format(bid=il) for il, r in enumerate(key_rank) if r < 192}
    factorized |= {constants.TENSOR_V.format(bid=il) for il, r in enumerate(value_rank) if r < 192}
    assert factorized and factorized.isdisjoint(out_t)
    for name, t in src_t.items():
        if name in factorized:
            continue
        o = out_t[name]
        assert o.tensor_type == t.tensor_type and list(o.shape) == list(t.shape), name
        assert o.data.tobytes() == t.data.tobytes(), name


def test_fast_reader_matches_the_stock_reader(smollm2_lorc, smollm2_readers) -> None:
    """FastGGUFReader (used by the converter) yields exactly the stock reader's fields and tensors
    (on the converted SmolLM2: tokenizer string arrays, uint32 rank arrays, quantized tensors)."""
    stock, fast = smollm2_readers[1], FastGGUFReader(smollm2_lorc[0])
    assert list(stock.fields) == list(fast.fields)
    for key, a in stock.fields.items():
        b = fast.fields[key]
        assert (a.offset, a.types, a.data) == (b.offset, b.types, b.data), key
        assert [p.tobytes() for p in a.parts] == [p.tobytes() for p in b.parts], key
        assert [p.dtype for p in a.parts] == [p.dtype for p in b.parts], key
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset, t.data.dtype, t.data.shape) for t in stock.tensors] == \
           [(t.name, t.tensor_type, list(t.shape), t.data_offset, t.data.dtype, t.data.shape) for t in fast.tensors]


def test_smollm2_factors_are_the_truncated_svd(smollm2_readers) -> None:
    src, lorc = smollm2_readers
    src_t, out_t = tensors_by_name(src), tensors_by_name(lorc)
    ranks = {"k": field(lorc, constants.key_rank_key("llama")), "v": field(lorc, constants.value_rank_key("llama"))}
    checked = 0
    for il in range(30):
        for side, dense, down_name, up_name in (
                ("k", constants.TENSOR_K, constants.TENSOR_K_DOWN, constants.TENSOR_K_UP),
                ("v", constants.TENSOR_V, constants.TENSOR_V_DOWN, constants.TENSOR_V_UP)):
            r = ranks[side][il]
            if r == 192:
                assert dense.format(bid=il) in out_t and down_name.format(bid=il) not in out_t
                continue
            down, up = out_t[down_name.format(bid=il)], out_t[up_name.format(bid=il)]
            assert down.tensor_type == up.tensor_type == QT.F32
            assert list(down.shape) == [576, r] and list(up.shape) == [r, 192]  # ggml order
            w = dequantized(src_t[dense.format(bid=il)])
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            truncated = (u[:, :r] * s[:r]) @ vt[:r]
            product = dequantized(up) @ dequantized(down)
            # Tolerance: the factors are the float64 SVD rounded once to float32 (relative error
            # <= u = 2^-24 per entry). Entry (i, j) of up @ down sums r terms up_ik down_kj, so its
            # error is <= 2u * sum_k |up_ik| |down_kj| <= 2u * ||up_i|| ||down_j|| <= 2u * sigma_1
            # (Cauchy-Schwarz; rows of up have norm <= sigma_1, down has orthonormal rows). The
            # float64 product adds ~1e-16; 4u * sigma_1 leaves room and is still far below any
            # real difference (a wrong rank or row order changes entries by ~sigma_r ~ 1e-1).
            np.testing.assert_array_less(np.abs(product - truncated), 4 * F32_UNIT_ROUNDOFF * s[0])
            # down keeps the latent in input units: orthonormal rows (S lives in up)
            d = dequantized(down)
            np.testing.assert_allclose(d @ d.T, np.eye(r), atol=1e-5)
            checked += 1
    assert checked >= 40


# --- synthetic models ----------------------------------------------------------------------------

# d_kv = 4 * 64 = 256 gives the rank grid 32, 64, ..., 256
WIDE = dict(n_layer=6, n_embd=256, n_head=4, n_head_kv=4, head_dim=64, n_ff=256)
WIDE_D = 256


def read_ranks(path: Path) -> tuple[list[int], list[int]]:
    reader = FastGGUFReader(path)
    return field(reader, constants.key_rank_key("llama")), field(reader, constants.value_rank_key("llama"))


@pytest.fixture(scope="module")
def planted_gguf(models_dir: Path) -> tuple[Path, list[float], list[float]]:
    kappa_k = [30.0, 2.0, 500.0, 5.0, 80.0, 3.0]
    kappa_v = [4.0, 40.0, 2.0, 9.0, 3.0, 100.0]
    spectra = {"key": [synth.geometric_spectrum(WIDE_D, k) for k in kappa_k],
               "value": [synth.geometric_spectrum(WIDE_D, k) for k in kappa_v]}
    path = synth.make_llama_gguf(models_dir / "planted.gguf", spectra=spectra, **WIDE)
    return path, kappa_k, kappa_v


def test_progressive_on_planted_spectra(planted_gguf, tmp_path: Path) -> None:
    path, kappa_k, kappa_v = planted_gguf
    report = convert(path, tmp_path / "out.gguf", allocation="progressive", ratio=0.5, progress=False, data_free=True)
    # the stored f32 weights keep the planted condition numbers
    np.testing.assert_allclose(report["kappa"]["key"], kappa_k, rtol=1e-3)
    np.testing.assert_allclose(report["kappa"]["value"], kappa_v, rtol=1e-3)
    key_rank, value_rank = read_ranks(tmp_path / "out.gguf")
    assert key_rank == report["key_rank"] and value_rank == report["value_rank"]
    for kappa, ranks in ((kappa_k, key_rank), (kappa_v, value_rank)):
        cum = np.cumsum(np.log(kappa)[::-1])[::-1]
        for i in range(len(ranks)):
            for j in range(len(ranks)):
                if cum[i] > cum[j]:
                    assert ranks[i] >= ranks[j], (ranks, cum)
        assert ranks[0] == WIDE_D  # largest cumulative condition: dense
    assert report["totals"]["kv_width_fraction"] == pytest.approx(0.5, abs=0.03)
    # energy kept matches the planted spectrum exactly (f32 storage aside)
    layer = report["layers"][-1]
    s = synth.geometric_spectrum(WIDE_D, kappa_k[-1])
    expected = float(np.sum(s[:layer["rank_k"]] ** 2) / np.sum(s ** 2))
    assert layer["energy_k"] == pytest.approx(expected, rel=1e-4)


@pytest.fixture(scope="module")
def wide_gguf(models_dir: Path) -> Path:
    return synth.make_llama_gguf(models_dir / "wide-f16.gguf", dtype="f16", seed=3, **WIDE)


def test_uniform_allocation(wide_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "u.gguf"
    report = convert(wide_gguf, out, allocation="uniform", ratio=0.5, progress=False, data_free=True)
    assert read_ranks(out) == ([128] * 6, [128] * 6)
    assert report["allocation"] == "uniform"
    assert field(FastGGUFReader(out), constants.KEY_ALLOCATION) == "uniform"


def test_key_and_value_ratios(wide_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "kv.gguf"
    convert(wide_gguf, out, allocation="uniform", key_ratio=0.25, value_ratio=0.75, progress=False, data_free=True)
    assert read_ranks(out) == ([64] * 6, [192] * 6)
    out2 = tmp_path / "kv2.gguf"
    report = convert(wide_gguf, out2, allocation="progressive", key_ratio=0.25, value_ratio=0.75, progress=False, data_free=True)
    assert report["totals"]["key_width_fraction"] == pytest.approx(0.25, abs=0.03)
    assert report["totals"]["value_width_fraction"] == pytest.approx(0.75, abs=0.03)


def test_explicit_ranks_including_dense_and_value_only_layers(wide_gguf: Path, tmp_path: Path) -> None:
    # layer 0 dense, layer 1 factorizes only V, odd ranks allowed for float factors
    key = [256, 256, 64, 100, 1, 32]
    value = [256, 96, 64, 17, 256, 32]
    spec = ",".join(str(x) for pair in zip(key, value) for x in pair)
    out = tmp_path / "explicit.gguf"
    report = convert(wide_gguf, out, ranks=spec, progress=False, data_free=True)
    assert report["allocation"] == "explicit"
    assert read_ranks(out) == (key, value)
    names = tensors_by_name(FastGGUFReader(out))
    assert constants.TENSOR_K.format(bid=1) in names and constants.TENSOR_K_DOWN.format(bid=1) not in names
    assert constants.TENSOR_V.format(bid=1) not in names
    assert list(names[constants.TENSOR_V_DOWN.format(bid=1)].shape) == [256, 96]
    assert list(names[constants.TENSOR_V_UP.format(bid=1)].shape) == [96, 256]
    assert list(names[constants.TENSOR_K_UP.format(bid=4)].shape) == [1, 256]
    # the same ranks from a JSON file, and from the report of this run
    as_json = tmp_path / "ranks.json"
    as_json.write_text(json.dumps({"key_rank": key, "value_rank": value}))
    convert(wide_gguf, tmp_path / "from-json.gguf", ranks=str(as_json), progress=False, data_free=True)
    convert(wide_gguf, tmp_path / "from-report.gguf", ranks=str(report_path(out)), progress=False, data_free=True)
    assert read_ranks(tmp_path / "from-json.gguf") == (key, value)
    assert (tmp_path / "from-report.gguf").read_bytes() == out.read_bytes()


@pytest.mark.parametrize("outtype, qtype", [("q8_0", QT.Q8_0), ("bf16", QT.BF16), ("f16", QT.F16)])
def test_factor_outtypes(wide_gguf: Path, tmp_path: Path, outtype: str, qtype: QT) -> None:
    out = tmp_path / f"{outtype}.gguf"
    report = convert(wide_gguf, out, allocation="uniform", ratio=0.5, outtype=outtype, progress=False, data_free=True)
    reader = FastGGUFReader(out)
    names = tensors_by_name(reader)
    src = tensors_by_name(FastGGUFReader(wide_gguf))
    for il in range(6):
        down, up = names[constants.TENSOR_K_DOWN.format(bid=il)], names[constants.TENSOR_K_UP.format(bid=il)]
        assert down.tensor_type == up.tensor_type == qtype
        assert list(down.shape) == [256, 128] and list(up.shape) == [128, 256]
        w = dequantized(src[constants.TENSOR_K.format(bid=il)])
        err = np.linalg.norm(w - dequantized(up) @ dequantized(down)) / np.linalg.norm(w)
        assert err == pytest.approx(report["layers"][il]["rel_error_k"], rel=1e-6)
        # storage rounding adds little to the truncation error of half the rank
        assert err <= report["layers"][il]["svd_error_k"] + 0.02


def test_quantized_input_and_determinism(models_dir: Path, tmp_path: Path) -> None:
    src = synth.make_llama_gguf(models_dir / "wide-q8_0.gguf", dtype="q8_0", seed=5, **WIDE)
    notices: list[str] = []
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    report = convert(src, a, ratio=0.5, progress=False, data_free=True, log=notices.append)
    convert(src, b, ratio=0.5, progress=False, data_free=True)
    assert any("quantized (Q8_0)" in n for n in notices) and report["notices"] == notices
    assert a.read_bytes() == b.read_bytes()
    # non-factorized tensors keep their quantized type and bytes
    src_t, out_t = tensors_by_name(FastGGUFReader(src)), tensors_by_name(FastGGUFReader(a))
    assert out_t["token_embd.weight"].tensor_type == QT.Q8_0
    assert out_t["token_embd.weight"].data.tobytes() == src_t["token_embd.weight"].data.tobytes()


def test_output_is_never_half_written(wide_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing leaves neither OUT nor a temporary file behind."""
    # the package attribute `convert` is the function; the pipeline module is in sys.modules
    pipeline = importlib.import_module("lorc_gguf.converter.pipeline")

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pipeline, "truncated_svd", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(wide_gguf, tmp_path / "out.gguf", progress=False, data_free=True)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_while_writing_leaves_nothing(wide_gguf: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or a full disk) in the middle of writing tensor data: OUT is not created and the
    temporary file beside it is removed."""
    calls = {"n": 0}
    original = gguf.GGUFWriter.write_tensor_data

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(wide_gguf, tmp_path / "out.gguf", progress=False, data_free=True)
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == []


def test_report_tool(wide_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.gguf"
    convert(wide_gguf, out, allocation="uniform", ratio=0.5, progress=False, data_free=True)
    tool = [sys.executable, str(REPO_ROOT / "tools" / "report.py")]
    proc = subprocess.run([*tool, str(out), "--json"], capture_output=True, text=True, check=True)
    info = json.loads(proc.stdout)
    assert info["lorc"] and info["key_rank"] == [128] * 6
    assert info["bytes_per_token_f16"] == 6 * 2 * 128 * 2 and info["bytes_per_token_f16_dense"] == 6 * 2 * 256 * 2
    assert len(info["kappa"]["key"]) == 6  # from the JSON report beside the file
    text = subprocess.run([*tool, str(out)], capture_output=True, text=True, check=True).stdout
    assert "128/256" in text and "bytes/token" in text
    assert "runtime defaults: plain latent cache; decoding rebuilds every latent key" in text
    assert info["sink_tokens"] == info["recent_window"] == info["decode_top_k"] == 0
    tuned = tmp_path / "t.gguf"
    convert(wide_gguf, tuned, allocation="uniform", ratio=0.5, progress=False, data_free=True, sink_tokens=4, recent_window=512,
            decode_top_k=128)
    text = subprocess.run([*tool, str(tuned)], capture_output=True, text=True, check=True).stdout
    assert ("runtime defaults: exact window, 4 sink tokens + 512 recent exact; decoding rebuilds the 128 best "
            "latent keys and attends the other latent cells at their scores") in text
    dense = subprocess.run([*tool, str(wide_gguf)], capture_output=True, text=True, check=True).stdout
    assert "not LoRC-converted" in dense


# --- the defaults ------------------------------------------------------------------------------

def test_design_card_command_is_calibrated_progressive_with_exact_cells(tiny_llama_gguf: Path, tmp_path: Path):
    """`convert.py MODEL OUT.gguf --progressive` (fewer calibration tokens, the same path)."""
    out = tmp_path / "default.gguf"
    proc = run_cli(str(tiny_llama_gguf), str(out), "--progressive", "--calib-tokens", "1024", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "notice: calibrated on 1024 tokens of the built-in text (docs, code, dialogue, encyclopedia" in proc.stderr
    reader = gguf.GGUFReader(out)
    assert field(reader, constants.KEY_METHOD) == "svd-whiten"
    assert field(reader, constants.KEY_ALLOCATION) == "progressive"
    assert field(reader, constants.KEY_SINK_TOKENS) == constants.DEFAULT_SINK_TOKENS == 4
    assert field(reader, constants.KEY_RECENT_WINDOW) == constants.DEFAULT_RECENT_WINDOW
    assert field(reader, constants.KEY_DECODE_TOP_K) == constants.DEFAULT_DECODE_TOP_K == 64  # selection on
    names = {t.name for t in reader.tensors}
    # exact cells need the dense projections beside the factors
    assert {"blk.0.attn_k.weight", "blk.0.attn_k_down.weight", "blk.0.attn_v_up.weight"} <= names
    report = json.loads(report_path(out).read_text())
    assert report["calibration"]["domains"] == {"docs": 1, "code": 1, "dialogue": 0, "encyclopedia": 0} or \
        sum(report["calibration"]["domains"].values()) == 2
    # no flag at all is the same file
    again = tmp_path / "no-flags.gguf"
    assert run_cli(str(tiny_llama_gguf), str(again), "--calib-tokens", "1024", "--no-progress").returncode == 0
    assert again.read_bytes() == out.read_bytes()


# sha256 of synth.make_llama_gguf() with its defaults, and of its conversion with the converter's
# defaults of lorc-gguf up to commit bb58308 (data-free SVD, progressive, width 0.5, f16 factors,
# plain latent cache), computed by that commit's code on this machine kind: --data-free must keep
# writing exactly the paper's file. The SVDs run on one BLAS thread (conftest), which makes the
# bytes independent of the core count; a different LAPACK build could round differently: then
# regenerate both hashes with that commit's code and say so.
TINY_LLAMA_SHA256 = "441cfc9dde305921a8aa08276c090ae3e3c829967a46c499d925e7b91d5ce802"
PAPER_FILE_SHA256 = "7ee79512e26febb4f292ee7423e26f5ca64cacc5ed3cd3cee8f396a6716bd75d"


def test_data_free_writes_the_papers_file_byte_for_byte(tiny_llama_gguf: Path, tmp_path: Path):
    import hashlib

    assert hashlib.sha256(tiny_llama_gguf.read_bytes()).hexdigest() == TINY_LLAMA_SHA256
    out = tmp_path / "paper.gguf"
    report = convert(tiny_llama_gguf, out, progress=False, data_free=True)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == PAPER_FILE_SHA256
    assert report["method"] == "svd" and report["allocation"] == "progressive"


def test_calibrated_progressive_weights_errors_by_depth():
    from lorc_gguf.converter import aware
    from lorc_gguf.arch import Side

    # equal condition numbers: the profile is the plain depth ramp 1 .. 0
    weights = aware.progressive_weights({Side.KEY: [10.0] * 5, Side.VALUE: [10.0] * 5}, strength=1.0)
    assert [weights[(Side.KEY, il)] for il in range(5)] == pytest.approx([2.0, 1.75, 1.5, 1.25, 1.0])
    # identical error curves with diminishing returns in every layer: sensitivity spreads ranks
    # evenly, the weighted rule gives the shallow layers more and never less to a shallower layer
    width, n_layer = 128, 5
    curve = np.exp(-np.arange(width + 1) / 200.0)
    curves = {(side, il): curve for side in (Side.KEY, Side.VALUE) for il in range(n_layer)}
    flat = aware.sensitivity(curves, (width,) * n_layer, (width,) * n_layer, ratio=0.5)
    tilted = aware.sensitivity(curves, (width,) * n_layer, (width,) * n_layer, ratio=0.5, layer_weight=weights,
                               method="progressive")
    assert len(set(flat.key_rank)) == 1
    assert list(tilted.key_rank) == sorted(tilted.key_rank, reverse=True) and tilted.key_rank[0] > tilted.key_rank[-1]
    assert tilted.kept_width == flat.kept_width and tilted.method == "progressive"
