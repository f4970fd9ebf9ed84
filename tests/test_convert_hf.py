"""Hugging Face safetensors folder as MODEL: converted by the pinned llama.cpp's own converter first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import synth
from lorc_gguf import convert
from lorc_gguf.converter.hf import converter_script
from lorc_gguf.format import keys as constants
from lorc_gguf.format.read import FastGGUFReader

F32_UNIT_ROUNDOFF = 2.0 ** -24


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.make_hf_llama_folder(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def hf_outputs(hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """Our conversion of the folder, and what the vendored convert_hf_to_gguf.py writes for it when
    run by hand (started first, in parallel: both spend most of their time importing torch)."""
    official = tmp_path_factory.mktemp("official") / "official-f16.gguf"
    by_hand = subprocess.Popen([sys.executable, str(converter_script()), str(hf_folder), "--outtype", "f16",
                                "--outfile", str(official)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        out = tmp_path_factory.mktemp("lorc-hf") / "tiny-lorc.gguf"
        report = convert(hf_folder, out, allocation="uniform", ratio=0.5, outtype="f32", progress=False, data_free=True)
    finally:
        _, stderr = by_hand.communicate()
    assert by_hand.returncode == 0, stderr.decode()[-2000:]
    return out, report, official


@pytest.fixture(scope="module")
def lorc_from_hf(hf_outputs) -> tuple[Path, dict]:
    return hf_outputs[0], hf_outputs[1]


@pytest.fixture(scope="module")
def official_gguf(hf_outputs) -> Path:
    return hf_outputs[2]


def test_hf_folder_converts(lorc_from_hf) -> None:
    out, report = lorc_from_hf
    assert report["source_format"] == "hf"
    assert report["key_rank"] == [32, 32] and report["value_rank"] == [32, 32]
    # the intermediate f16 GGUF lived in a temporary folder beside OUT and is gone
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, out.name + ".lorc.json"]


def test_hf_metadata_equals_the_official_converter(lorc_from_hf, official_gguf: Path, smollm2_path: Path) -> None:
    ours, official = FastGGUFReader(lorc_from_hf[0]), FastGGUFReader(official_gguf)
    expected = {k: f for k, f in official.fields.items() if not k.startswith("GGUF.")}
    tokenizer_keys = [k for k in expected if k.startswith("tokenizer.")]
    assert {"tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"} <= set(tokenizer_keys)
    for key, f in expected.items():
        assert ours.fields[key].types == f.types, key
        assert ours.fields[key].contents() == f.contents(), key
    extra = {k for k in ours.fields if not k.startswith("GGUF.")} - set(expected)
    assert extra == {constants.KEY_VERSION, constants.KEY_ALLOCATION, constants.KEY_METHOD, constants.KEY_SINK_TOKENS,
                     constants.KEY_RECENT_WINDOW, constants.KEY_DECODE_TOP_K, constants.key_rank_key("llama"),
                     constants.value_rank_key("llama")}
    # and the folder's tokenizer really is SmolLM2's
    smol = FastGGUFReader(smollm2_path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre"):
        assert ours.fields[key].contents() == smol.fields[key].contents(), key


def test_hf_tensors_match_the_official_gguf(lorc_from_hf, official_gguf: Path) -> None:
    import gguf

    ours = {t.name: t for t in FastGGUFReader(lorc_from_hf[0]).tensors}
    official = {t.name: t for t in FastGGUFReader(official_gguf).tensors}
    for name, t in official.items():
        if name in ours:
            assert ours[name].tensor_type == t.tensor_type and ours[name].data.tobytes() == t.data.tobytes(), name
            continue
        # a factorized projection: its factors are the truncated SVD of the official f16 weight
        side = "k" if ".attn_k." in name else "v"
        bid = int(name.split(".")[1])
        down = ours[f"blk.{bid}.attn_{side}_down.weight"]
        up = ours[f"blk.{bid}.attn_{side}_up.weight"]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        truncated = (u[:, :32] * s[:32]) @ vt[:32]
        product = up.data.astype(np.float64) @ down.data.astype(np.float64)  # (64, 32) @ (32, n_embd)
        # same bound as for SmolLM2 (tests/test_convert.py): f32 factors, |error| <= 2u * sigma_1
        np.testing.assert_array_less(np.abs(product - truncated), 4 * F32_UNIT_ROUNDOFF * s[0])
