"""Every refusal of tools/convert.py: exit status 2, one line `error: ...`, no output left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from lorc_gguf import LorcError
from lorc_gguf import convert
from lorc_gguf.cli.convert import convert_main

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lorc_gguf_file(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "tiny-lorc.gguf"
    convert(tiny_llama_gguf, out, progress=False, data_free=True)
    return out


@pytest.fixture(scope="module")
def unsupported_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("phi3") / "phi3.gguf"
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Each case: (id, build argv from (model, lorc file, unsupported-architecture file, out folder), expected message part)
Case = tuple[str, Callable[[Path, Path, Path, Path], list[str]], str]
CASES: list[Case] = [
    ("missing-model", lambda m, l, q, d: [str(d / "nope.gguf"), str(d / "out.gguf")], "MODEL not found"),
    ("not-a-gguf", lambda m, l, q, d: [str(_text_file(d)), str(d / "out.gguf")], "is not a GGUF file"),
    ("empty-folder", lambda m, l, q, d: [str(_folder(d, {})), str(d / "out.gguf")], "not a Hugging Face model"),
    ("folder-without-safetensors", lambda m, l, q, d: [str(_folder(d, {"config.json": "{}"})), str(d / "out.gguf")],
     "not a Hugging Face model"),
    ("unsupported-architecture", lambda m, l, q, d: [str(q), str(d / "out.gguf")],
     "unsupported architecture 'phi3' (supported: llama, qwen2, gemma3)"),
    ("already-lorc", lambda m, l, q, d: [str(l), str(d / "out.gguf")], "already LoRC-converted"),
    ("ratio-zero", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--ratio", "0"], "ratio must be in (0, 1]"),
    ("ratio-above-one", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--ratio", "1.5"], "ratio must be in (0, 1]"),
    ("ratio-negative", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--ratio=-0.2"], "ratio must be in (0, 1]"),
    ("key-ratio-zero", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--key-ratio", "0"],
     "key ratio must be in (0, 1]"),
    ("value-ratio-above-one", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--value-ratio", "2"],
     "value ratio must be in (0, 1]"),
    ("rank-above-width", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--ranks", "65,32,32,32,32,32,32,32"],
     "layer 0 key rank 65 is outside [1, 64]"),
    ("rank-zero", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--ranks", "32,32,32,0,32,32,32,32"],
     "layer 1 value rank 0 is outside [1, 64]"),
    ("ranks-wrong-length", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--ranks", "32,32,32"],
     "--ranks has 3 numbers, expected 8"),
    ("ranks-file-missing", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--ranks", str(d / "no.json")],
     "cannot read ranks file"),
    ("q8_0-rank-not-multiple-of-32", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--outtype", "q8_0",
                                                        "--ranks", "40,64,64,64,64,64,64,64"],
     "not a multiple of 32"),
    ("truncated-gguf", lambda m, l, q, d: [str(_truncated(m, d, 3_000_000)), str(d / "out.gguf")], "unreadable GGUF"),
    ("truncated-header", lambda m, l, q, d: [str(_truncated(m, d, 100)), str(d / "out.gguf")], "unreadable GGUF"),
    ("decode-top-k-negative", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--decode-top-k=-1"],
     "decode top-k must be an integer in [0, 1000000], got -1"),
    ("out-equals-model", lambda m, l, q, d: [str(m), str(m)], "OUT is the same file as MODEL"),
    ("data-free-with-calibration", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--data-free", "--calibration",
                                                      "builtin"], "--data-free uses no statistics"),
    ("data-free-with-method", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--data-free", "--method",
                                                 "svd-whiten"], "--data-free is the paper's method (svd)"),
    ("center-with-exact-cells", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--center", "--recent-window", "8"],
     "--center cannot be combined with the exact sinks / window"),
    ("calibration-text-missing", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--calibration", str(d / "no.txt")],
     "no.txt not found (a file, 'builtin', or domains from docs, code, dialogue, encyclopedia)"),
    ("calibration-held-out-domain", lambda m, l, q, d: [str(m), str(d / "out.gguf"), "--calibration", "docs,news"],
     "domain 'news' is not for calibration (choose from docs, code, dialogue, encyclopedia)"),
    ("out-folder-missing", lambda m, l, q, d: [str(m), str(d / "missing" / "out.gguf")],
     "the folder of OUT does not exist"),
]


def _truncated(model: Path, d: Path, n_bytes: int) -> Path:
    """The first n_bytes of a valid GGUF: a download or copy that stopped early."""
    p = d / "truncated.gguf"
    with open(model, "rb") as f:
        p.write_bytes(f.read(n_bytes))
    return p


def _text_file(d: Path) -> Path:
    p = d / "model.txt"
    p.write_text("hello\n")
    return p


def _folder(d: Path, files: dict[str, str]) -> Path:
    folder = d / "folder"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_error_rows(case: Case, tiny_llama_gguf: Path, lorc_gguf_file: Path, unsupported_gguf: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    _, make_argv, message = case
    argv = make_argv(tiny_llama_gguf, lorc_gguf_file, unsupported_gguf, tmp_path) + ["--no-progress"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    model_bytes = tiny_llama_gguf.stat().st_size
    assert convert_main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if not ln.startswith("notice: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    # nothing written: no OUT, no report, no temporary file, inputs untouched
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert tiny_llama_gguf.stat().st_size == model_bytes


def test_cli_process_exit_status(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "convert.py"), str(tmp_path / "missing.gguf"),
                           str(tmp_path / "out.gguf")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: MODEL not found: {tmp_path / 'missing.gguf'}"
    assert proc.stdout == ""


def test_library_raises_lorc_error(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(LorcError):
        convert(tiny_llama_gguf, tmp_path / "out.gguf", ratio=0, progress=False, data_free=True)
    with pytest.raises(LorcError, match="unknown outtype"):
        convert(tiny_llama_gguf, tmp_path / "out.gguf", outtype="q4_0", progress=False, data_free=True)
    with pytest.raises(LorcError, match="unexpected keyword"):
        convert(tiny_llama_gguf, tmp_path / "out.gguf", ration=0.5)
    assert list(tmp_path.iterdir()) == []


def test_architecture_registry_is_the_runtime_list() -> None:
    """The registry is the one list of supported architectures (those whose graph in the patched
    runtime opts into the latent cache), and each entry names the numpy forward that calibrates it."""
    from lorc_gguf import arch
    from lorc_gguf.calibration.forward import forward_class

    assert arch.registered() == ("llama", "qwen2", "gemma3")
    for name in arch.registered():
        assert forward_class(name).__name__ == arch.for_name(name).forward


def test_values_only_preset(tiny_llama_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--values-only keeps every key dense and spends --ratio on the values; combined with a
    --key-ratio other than 1 it is a usage error."""
    out = tmp_path / "v.gguf"
    assert convert_main([str(tiny_llama_gguf), str(out), "--uniform", "--values-only", "--ratio", "0.5",
                         "--no-progress", "--quiet"]) == 0
    report = json.loads((tmp_path / "v.gguf.lorc.json").read_text())
    assert all(layer["rank_k"] == layer["width_k"] for layer in report["layers"])
    assert all(layer["rank_v"] < layer["width_v"] for layer in report["layers"])
    assert report["totals"]["kv_width_fraction"] == pytest.approx(0.75)
    with pytest.raises(SystemExit):
        convert_main([str(tiny_llama_gguf), str(tmp_path / "x.gguf"), "--values-only", "--key-ratio", "0.5"])
    assert "drop --key-ratio" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_decode_top_k_without_latent_keys_is_noticed(tiny_llama_gguf: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A file whose keys are all dense has nothing to select: --decode-top-k converts but says so."""
    out = tmp_path / "v.gguf"
    assert convert_main([str(tiny_llama_gguf), str(out), "--uniform", "--values-only", "--ratio", "0.5",
                         "--decode-top-k", "64", "--no-progress", "--quiet"]) == 0
    assert "--decode-top-k has no effect on this file: no layer's keys are latent" in capsys.readouterr().err
    assert convert_main([str(tiny_llama_gguf), str(tmp_path / "k.gguf"), "--uniform", "--ratio", "0.5",
                         "--decode-top-k", "64", "--no-progress", "--quiet"]) == 0
    assert "--decode-top-k" not in capsys.readouterr().err
