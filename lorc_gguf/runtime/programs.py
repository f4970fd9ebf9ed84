"""llama.cpp's own programs from the patched tree (``build.build_tools``): where they are, and the
servers (``llama-server``, ``ggml-rpc-server``) started on 127.0.0.1 and stopped again.

    with programs.llama_server(model, ["-np", "4"]) as server:
        server.url            # http://127.0.0.1:PORT, OpenAI-compatible under /v1
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from . import build


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def programs_dir(log=_stderr) -> Path:
    """The bin folder of llama.cpp's programs built from the patched tree with this machine's
    options (built on first use, several minutes; cached by the same key as the wheel). Progress
    goes to stderr, so that a shell can take the folder from stdout."""
    return build.build_tools(build.native_options(log), build.TOOL_TARGETS, log)


def ggml_program(source: Path, out: Path, bin_dir: Path | None = None,
                 flags: Sequence[str] = ("-O2", "-march=native")) -> Path:
    """Compile one C++ file (tests/kernels/) against the ggml of the patched tree's programs build:
    its headers, the CPU backend's internal ones (vec.h) and its libraries, found at run time through
    a RUNPATH that LD_LIBRARY_PATH may override (to run the same program on another build)."""
    bin_dir = bin_dir or programs_dir()
    ggml = bin_dir.parents[1] / "src" / "vendor" / "llama.cpp" / "ggml"
    cmd = ["g++", "-std=c++17", *flags, "-I", str(ggml / "include"), "-I", str(ggml / "src"),
           "-I", str(ggml / "src" / "ggml-cpu"), str(source), "-o", str(out), "-L", str(bin_dir),
           "-lggml-base", "-lggml-cpu", f"-Wl,--enable-new-dtags,-rpath,{bin_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {source.name} failed:\n{proc.stderr[-3000:]}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Running:
    """A started server: its address, process and log file."""

    host: str
    port: int
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict, timeout: float = 300.0):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())


def _answers(port: int, path: str):
    """A readiness check: whether GET path on 127.0.0.1:port answers 200."""
    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False
    return ready


@contextmanager
def _started(cmd: list[str], name: str, ready, timeout: float, log_dir: Path | None) -> Iterator[tuple[subprocess.Popen, Path]]:
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="lorc-programs-"))
    log = log_dir / f"{name}-{os.getpid()}-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{_tail(log)}")
            time.sleep(0.1)
        yield proc, log
    finally:
        _stop(proc)


@contextmanager
def llama_server(model: str | os.PathLike, args: Sequence[str] = (), bin_dir: Path | None = None,
                 timeout: float = 120.0, log_dir: Path | None = None) -> Iterator[Running]:
    """``llama-server -m model args`` on 127.0.0.1 and a free port, until its /health answers;
    stopped (SIGTERM, then SIGKILL) when the block ends."""
    bin_dir = bin_dir or programs_dir()
    port = free_port()
    cmd = [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), *args]

    with _started(cmd, "llama-server", _answers(port, "/health"), timeout, log_dir) as (proc, log):
        yield Running("127.0.0.1", port, proc, log)


@contextmanager
def rpc_server(threads: int = 1, bin_dir: Path | None = None, timeout: float = 30.0,
               log_dir: Path | None = None) -> Iterator[Running]:
    """``ggml-rpc-server`` (its CPU device) on 127.0.0.1 and a free port, until it accepts a
    connection; ``endpoint`` is what ``--rpc`` takes."""
    bin_dir = bin_dir or programs_dir()
    port = free_port()
    cmd = [str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)]

    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    with _started(cmd, "ggml-rpc-server", ready, timeout, log_dir) as (proc, log):
        yield Running("127.0.0.1", port, proc, log)


@contextmanager
def llama_cpp_python_server(model: str | os.PathLike, args: Sequence[str] = (), timeout: float = 120.0,
                            log_dir: Path | None = None) -> Iterator[Running]:
    """llama-cpp-python's own OpenAI-compatible server (``python -m llama_cpp.server``, its
    ``server`` extra) over the patched bindings, on 127.0.0.1 and a free port."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), *args]

    with _started(cmd, "llama_cpp.server", _answers(port, "/v1/models"), timeout, log_dir) as (proc, log):
        yield Running("127.0.0.1", port, proc, log)
