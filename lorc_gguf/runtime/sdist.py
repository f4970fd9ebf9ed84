"""The pinned llama-cpp-python sdist: download (through pip, so only the package registry is used),
verify its sha256 and unpack it into a cache folder.

The converter needs the vendored ``convert_hf_to_gguf.py`` of exactly this release for HF input, and
the runtime build applies ``patches/llama.cpp`` to its vendored tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PATCH_DIR = REPO_ROOT / "patches" / "llama.cpp"  # applied inside vendor/llama.cpp
BINDINGS_PATCH_DIR = REPO_ROOT / "patches" / "llama-cpp-python"  # applied at the sdist root
PIN_FILE = PATCH_DIR / "PIN"


class SdistError(RuntimeError):
    pass


@dataclass(frozen=True)
class Pin:
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"llama_cpp_python-{self.version}.tar.gz"


def read_pin(path: Path = PIN_FILE) -> Pin:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    try:
        return Pin(version=values["version"], sha256=values["sha256"].lower())
    except KeyError as e:
        raise SdistError(f"{path}: missing '{e.args[0]} = ...' line") from None


def cache_dir() -> Path:
    root = os.environ.get("LORC_GGUF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lorc-gguf")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_sdist(pin: Pin | None = None, log=print) -> Path:
    """Return the path of the verified sdist archive, downloading it with pip when missing."""
    pin = pin or read_pin()
    archive = cache_dir() / pin.filename
    if archive.exists() and sha256_file(archive) == pin.sha256:
        return archive
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        log(f"downloading llama-cpp-python=={pin.version} sdist with pip ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"llama-cpp-python=={pin.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / pin.filename
        if proc.returncode != 0 or not got.exists():
            raise SdistError(f"pip could not download llama-cpp-python=={pin.version}:\n{proc.stderr.strip()}")
        digest = sha256_file(got)
        if digest != pin.sha256:
            raise SdistError(f"sha256 mismatch for {pin.filename}: expected {pin.sha256}, got {digest}; "
                             f"refusing to build from it (update {PIN_FILE} only on purpose)")
        os.replace(got, archive)
    return archive


def pristine_tree(pin: Pin | None = None, log=print) -> Path:
    """Unpacked, unpatched sdist tree (read-only use: copy it before patching)."""
    pin = pin or read_pin()
    dest = cache_dir() / f"llama_cpp_python-{pin.version}-{pin.sha256[:12]}"
    if (dest / ".complete").exists():
        return dest / f"llama_cpp_python-{pin.version}"
    archive = ensure_sdist(pin, log)
    shutil.rmtree(dest, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (dest / ".complete").touch()
    return dest / f"llama_cpp_python-{pin.version}"


def vendored_llama_cpp(pin: Pin | None = None, log=print) -> Path:
    return pristine_tree(pin, log) / "vendor" / "llama.cpp"
