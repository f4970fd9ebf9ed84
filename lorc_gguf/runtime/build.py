"""Build the patched runtime: pinned llama-cpp-python sdist + the ``patches/llama.cpp`` series (the
runtime) + the ``patches/llama-cpp-python`` series (its Python bindings).

Steps: verify the sdist (``sdist.py``), copy it, apply the llama.cpp series to ``vendor/llama.cpp``
and the bindings series to the sdist root (failing loudly, naming the patch and hunk), build a wheel
with pip (scikit-build-core drives CMake) and install it into the running interpreter's
environment. Wheels are cached by (sdist sha256, both series' hashes, CMake flags), so a second run
only reinstalls.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import sdist

# Only the shared library is needed by the Python package; llava/mtmd and llama.cpp's programs
# would double the build time (tools can be built separately with build_tools()).
BASE_CMAKE_ARGS = ("-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                   "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF")
SHORTCUTS = {"cuda": "-DGGML_CUDA=ON", "metal": "-DGGML_METAL=ON", "vulkan": "-DGGML_VULKAN=ON"}
# llama.cpp's programs, built from the same patched tree (build_tools). llama-server is defined only
# with LLAMA_BUILD_SERVER, the RPC server only with GGML_RPC (which also gives the tools' libllama the
# RPC backend that --rpc uses); llama-cli needs the server library too and is not built (llama-completion
# is the command-line generator)
TOOL_CMAKE_ARGS = ("-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DGGML_RPC=ON", "-DLLAMA_CURL=OFF")
TOOL_TARGETS = ("llama-perplexity", "llama-bench", "llama-quantize", "llama-imatrix", "llama-completion",
                "llama-server", "ggml-rpc-server")
# Compiler flags that switch AMX off under -march=native (GCC and Clang let an explicit -mno-* win
# over the ISA set -march implies, whatever the order on the command line).
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

# Requests the AMX tile state from Linux (as ggml's AMX init does) and loads a tile
# configuration: the first instruction ggml's AMX matmul executes.
_AMX_PROBE_C = r"""
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */)) return 2;
    unsigned char cfg[64];
    memset(cfg, 0, sizeof cfg);
    cfg[0] = 1;                       /* palette 1 */
    cfg[16] = 64; cfg[48] = 16;       /* tile 0: 16 rows of 64 bytes */
    _tile_loadconfig(cfg);
    _tile_zero(0);
    _tile_release();
    return 0;
}
"""


class BuildError(RuntimeError):
    pass


def cpu_reports_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_tile" in flags.split()


def amx_runs() -> bool:
    """Whether AMX tile instructions actually execute here. Some virtual machines report the AMX
    CPU flags and grant the tile permission but fault on the first tile instruction; llama.cpp
    built with -march=native then segfaults in every quantized matmul (ggml_backend_amx_mul_mat)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "amx.c", Path(tmp) / "amx"
        src.write_text(_AMX_PROBE_C)
        built = subprocess.run([compiler, "-O1", "-mamx-tile", "-o", str(exe), str(src)], capture_output=True)
        if built.returncode != 0:
            return False
        try:
            return subprocess.run([str(exe)], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False


def native_compiler_flags(log=print) -> str:
    """Extra C/C++ flags for a native build of llama.cpp on this machine ("" for none)."""
    if cpu_reports_amx() and not amx_runs():
        log("this CPU reports AMX but AMX instructions fault here (a virtual machine?): building without AMX")
        return NO_AMX_FLAGS
    return ""


@dataclass(frozen=True)
class Series:
    directory: Path
    patches: tuple[Path, ...]
    target: str = "vendor/llama.cpp"  # where inside the sdist ``patch -p1`` applies them

    def digest(self) -> str:
        h = hashlib.sha256()
        for patch in self.patches:
            h.update(patch.name.encode() + b"\0" + patch.read_bytes() + b"\0")
        return h.hexdigest()


def read_series(directory: Path = sdist.PATCH_DIR, target: str = "vendor/llama.cpp") -> Series:
    series_file = directory / "series"
    names = [line.split("#", 1)[0].strip() for line in series_file.read_text().splitlines()]
    patches = tuple(directory / name for name in names if name)
    missing = [p.name for p in patches if not p.exists()]
    if missing:
        raise BuildError(f"{series_file}: listed patches missing: {', '.join(missing)}")
    return Series(directory, patches, target)


def read_runtime_series() -> tuple[Series, Series]:
    """The llama.cpp series (inside vendor/llama.cpp) and the bindings series (at the sdist root)."""
    return read_series(), read_series(sdist.BINDINGS_PATCH_DIR, ".")


def apply_series(series: Series, sdist_root: Path, log=print) -> None:
    """Apply every patch in order with ``patch -p1`` inside ``sdist_root / series.target``; a
    failure names the patch and the hunk."""
    if shutil.which("patch") is None:
        raise BuildError("the 'patch' program is required (apt-get install patch)")
    for patch in series.patches:
        cmd = ["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-d", str(sdist_root / series.target),
               "-i", str(patch)]
        dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True)
        if dry.returncode != 0:
            failed = [line for line in dry.stdout.splitlines() if "FAILED" in line or "can't find" in line
                      or "Reversed" in line or "malformed" in line]
            detail = "\n  ".join(failed or dry.stdout.strip().splitlines()[-5:])
            raise BuildError(f"patch {patch.name} does not apply to the pinned sdist ({series.target}):\n  {detail}")
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        log(f"applied {patch.name}")


def patched_tree(series: Sequence[Series], dest: Path, log=print) -> Path:
    """Fresh copy of the pinned sdist with every series applied; returns the sdist root."""
    pristine = sdist.pristine_tree(log=log)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(pristine, dest, symlinks=True)
    for s in series:
        apply_series(s, dest, log)
    return dest


@dataclass
class BuildOptions:
    cmake_args: list[str] = field(default_factory=list)
    shortcuts: list[str] = field(default_factory=list)  # "cuda", "metal", "vulkan"
    jobs: int = os.cpu_count() or 2
    force: bool = False
    compiler_flags: str = ""  # CFLAGS/CXXFLAGS for the llama.cpp build (see native_compiler_flags)

    def all_cmake_args(self) -> list[str]:
        return [*BASE_CMAKE_ARGS, *(SHORTCUTS[s] for s in self.shortcuts), *self.cmake_args]


def cache_key(series: Sequence[Series], options: BuildOptions) -> str:
    pin = sdist.read_pin()
    h = hashlib.sha256()
    for part in (pin.sha256, *(s.digest() for s in series), " ".join(options.all_cmake_args()),
                 sys.version.split()[0], options.compiler_flags):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _compiler_env(options: BuildOptions) -> dict[str, str]:
    """The environment for CMake: CFLAGS/CXXFLAGS seed CMAKE_C_FLAGS/CMAKE_CXX_FLAGS."""
    env = dict(os.environ)
    if options.compiler_flags:
        for var in ("CFLAGS", "CXXFLAGS"):
            env[var] = f"{env.get(var, '')} {options.compiler_flags}".strip()
    return env


def build_wheel(options: BuildOptions, log=print) -> Path:
    series = read_runtime_series()
    key = cache_key(series, options)
    wheel_dir = sdist.cache_dir() / "wheels" / key
    wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl")) if wheel_dir.exists() else []
    if wheels and not options.force:
        log(f"using cached patched wheel {wheels[-1].name} (key {key})")
        return wheels[-1]

    with tempfile.TemporaryDirectory(dir=sdist.cache_dir()) as tmp:
        src = patched_tree(series, Path(tmp) / "src", log)
        out = Path(tmp) / "wheel"
        env = _compiler_env(options)
        env["CMAKE_ARGS"] = " ".join(options.all_cmake_args())
        env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(options.jobs)
        log(f"building the patched llama-cpp-python (CMAKE_ARGS={env['CMAKE_ARGS']}); "
            "this takes several minutes ...")
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
               "-w", str(out), str(src)]
        log_path = sdist.cache_dir() / f"build-{key}.log"
        with open(log_path, "w") as build_log:
            proc = subprocess.run(cmd, stdout=build_log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise BuildError(f"building the patched wheel failed (full log: {log_path}):\n{tail}")
        built = sorted(out.glob("llama_cpp_python-*.whl"))
        if not built:
            raise BuildError(f"pip wheel produced no wheel (log: {log_path})")
        wheel_dir.mkdir(parents=True, exist_ok=True)
        final = wheel_dir / built[-1].name
        shutil.copy2(built[-1], str(final) + ".tmp")
        os.replace(str(final) + ".tmp", final)
    return final


def install_wheel(wheel: Path, log=print) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--disable-pip-version-check",
           "-q", str(wheel)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"installing {wheel.name} failed:\n{proc.stderr.strip()}")
    log(f"installed {wheel.name} into {sys.prefix}")


def build_tools(options: BuildOptions, targets=TOOL_TARGETS, log=print) -> Path:
    """Build llama.cpp's own programs from the same patched tree; returns the bin directory."""
    series = read_runtime_series()
    key = cache_key(series, options)
    root = sdist.cache_dir() / "tools" / key
    bin_dir = root / "build" / "bin"
    if not options.force and all((bin_dir / t).exists() for t in targets):
        return bin_dir
    src = patched_tree(series, root / "src", log)
    llama_cpp = src / "vendor" / "llama.cpp"
    own = tuple(a.split("=", 1)[0] + "=" for a in TOOL_CMAKE_ARGS)
    args = [a for a in options.all_cmake_args() if not a.startswith(own)]
    cfg = ["cmake", "-S", str(llama_cpp), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
           *TOOL_CMAKE_ARGS, *args]
    log(f"building {', '.join(targets)} from the patched tree into {bin_dir}; this takes several minutes ...")
    for cmd in (cfg, ["cmake", "--build", str(root / "build"), "-j", str(options.jobs), "--target", *targets]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_compiler_env(options))
        if proc.returncode != 0:
            raise BuildError(f"{' '.join(cmd[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    log(f"built {', '.join(targets)} in {bin_dir}")
    return bin_dir


def native_options(log=print) -> BuildOptions:
    """The options ``make runtime`` builds with on this machine (CPU, AMX decided by the probe)."""
    return BuildOptions(compiler_flags=native_compiler_flags(log))


# --- CUDA ---------------------------------------------------------------------------------------

def cuda_cmake_args(arch: str | None) -> list[str]:
    """The CMake flags of a CUDA build: the nvcc found (PATH, else /usr/local/cuda/bin) and the GPU
    architectures (None: ggml-cuda's default list, every supported generation, several times the
    build time of one); raises BuildError naming the fix when there is no nvcc."""
    nvcc = shutil.which("nvcc") or next((str(p) for p in (Path("/usr/local/cuda/bin/nvcc"),) if p.exists()), None)
    if nvcc is None:
        raise BuildError("the CUDA build needs nvcc: install the CUDA toolkit and put its bin folder on PATH")
    args = [f"-DCMAKE_CUDA_COMPILER={nvcc}", *([f"-DCMAKE_CUDA_ARCHITECTURES={arch}"] if arch else [])]
    if not has_cuda_driver_library(Path(nvcc)):
        # ggml-cuda links the driver library for its virtual-memory pool; without it (a machine with
        # the toolkit but neither a GPU driver nor the toolkit's stubs) the legacy pool builds
        args.append("-DGGML_CUDA_NO_VMM=ON")
    return args


def has_cuda_driver_library(nvcc: Path) -> bool:
    """Whether CMake's CUDA::cuda_driver can be found: libcuda.so from a driver (ldconfig) or the
    toolkit's link stub (lib64/stubs), the toolkit found from nvcc (resolving wrapper scripts)."""
    roots = {nvcc.resolve().parent.parent}
    try:
        text = nvcc.read_text(errors="replace") if nvcc.stat().st_size < 4096 else ""
    except OSError:
        text = ""
    roots |= {Path(m).parent.parent for m in re.findall(r"(/\S+/bin/nvcc)", text)}
    for root in roots:
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib"):
            if any((root / lib / sub / "libcuda.so").exists() for sub in ("", "stubs")):
                return True
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    return "libcuda.so" in out


# --- Vulkan -------------------------------------------------------------------------------------
# The pinned ggml-vulkan needs Vulkan-Hpp headers that know VK_EXT_layer_settings
# (vk::LayerSettingEXT, Vulkan headers 1.3.272 and later): Debian 12's libvulkan-dev (1.3.239) is too
# old, Debian 13's (1.4.309) works. Only the headers are needed from it: the loader (libvulkan.so.1)
# of Debian 12 resolves every entry point at run time.
VULKAN_HEADERS_SUITE = "trixie"  # the Debian suite fetch_vulkan_headers downloads libvulkan-dev from
VULKAN_FIX = ("run `python tools/build_runtime.py --fetch-vulkan-headers` (downloads Debian 13's libvulkan-dev "
              "headers into the cache) or pass --vulkan-include DIR with Vulkan headers >= 1.3.272")


def vulkan_headers_dir() -> Path:
    """Where fetch_vulkan_headers unpacks libvulkan-dev (its usr/include is the include dir)."""
    return sdist.cache_dir() / "vulkan-headers"


def vulkan_header_version(include: Path) -> int | None:
    """VK_HEADER_VERSION of the headers under ``include`` (None where there are none)."""
    core = include / "vulkan" / "vulkan_core.h"
    if not core.is_file():
        return None
    for line in core.read_text(errors="replace").splitlines():
        if line.startswith("#define VK_HEADER_VERSION ") and line.split()[-1].isdigit():
            return int(line.split()[-1])
    return None


def vulkan_headers_usable(include: Path) -> bool:
    """Whether the Vulkan-Hpp headers under ``include`` declare vk::LayerSettingEXT."""
    for hpp in sorted((include / "vulkan").glob("vulkan*.hpp")):
        if "struct LayerSettingEXT" in hpp.read_text(errors="replace"):
            return True
    return False


def _spirv_headers_found() -> bool:
    roots = [Path("/usr/share/cmake"), Path("/usr/lib/cmake"), *Path("/usr/lib").glob("*/cmake"),
             Path("/usr/local/share/cmake"), Path("/usr/local/lib/cmake")]
    if os.environ.get("VULKAN_SDK"):
        roots.append(Path(os.environ["VULKAN_SDK"]))
    return any(any(r.rglob("SPIRV-HeadersConfig.cmake")) for r in roots if r.is_dir())


def vulkan_cmake_args(include: Path | None = None, log=print) -> list[str]:
    """The CMake flags a Vulkan build needs here (the include dir when it is not the system's);
    raises BuildError naming the fix when glslc, SPIR-V headers, the loader or new enough headers are
    missing."""
    if shutil.which("glslc") is None:
        raise BuildError("the Vulkan build needs glslc (shader compiler): apt-get install glslc, or the Vulkan SDK's")
    if not _spirv_headers_found():
        raise BuildError("the Vulkan build needs SPIRV-Headers' CMake config: apt-get install spirv-headers")
    if not any(Path(d).glob("libvulkan.so") for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib",
                                                     "/usr/local/lib", os.environ.get("VULKAN_SDK", "/nonexistent") + "/lib")):
        raise BuildError("the Vulkan build needs the Vulkan loader (libvulkan.so): apt-get install libvulkan-dev")
    candidates = [include] if include is not None else [
        *([Path(os.environ["VULKAN_SDK"]) / "include"] if os.environ.get("VULKAN_SDK") else []),
        vulkan_headers_dir() / "usr" / "include", Path("/usr/include")]
    for cand in candidates:
        if vulkan_headers_usable(cand):
            log(f"Vulkan headers {vulkan_header_version(cand)} from {cand}")
            return [] if cand == Path("/usr/include") else [f"-DVulkan_INCLUDE_DIR={cand}"]
    found = ", ".join(f"{c} ({vulkan_header_version(c) or 'none'})" for c in candidates)
    raise BuildError(f"Vulkan headers too old or missing for the pinned ggml-vulkan (need vk::LayerSettingEXT; "
                     f"found {found}): {VULKAN_FIX}")


def fetch_vulkan_headers(log=print) -> Path:
    """Download Debian 13's libvulkan-dev with apt (a sources list of its own, so the system's apt
    state is untouched) and unpack it into the cache; returns its include dir."""
    dest = vulkan_headers_dir()
    include = dest / "usr" / "include"
    if vulkan_headers_usable(include):
        log(f"Vulkan headers {vulkan_header_version(include)} already in {include}")
        return include
    for prog in ("apt-get", "dpkg"):
        if shutil.which(prog) is None:
            raise BuildError(f"--fetch-vulkan-headers needs {prog} (Debian/Ubuntu); elsewhere install the Vulkan SDK "
                             "and pass --vulkan-include $VULKAN_SDK/include")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "lists" / "partial").mkdir(parents=True)
        (t / "sources.list").write_text(f"deb http://deb.debian.org/debian {VULKAN_HEADERS_SUITE} main\n")
        opts = ["-o", f"Dir::Etc::SourceList={t / 'sources.list'}", "-o", "Dir::Etc::SourceParts=-",
                "-o", f"Dir::State::Lists={t / 'lists'}", "-o", "APT::Sandbox::User=root"]
        for cmd in (["apt-get", *opts, "update"], ["apt-get", *opts, "download", "libvulkan-dev"]):
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                raise BuildError(f"{' '.join(cmd[:1] + cmd[-2:])} failed: {proc.stderr.strip()[-500:]}")
        debs = sorted(t.glob("libvulkan-dev_*.deb"))
        if not debs:
            raise BuildError("apt-get download libvulkan-dev produced no .deb")
        shutil.rmtree(dest, ignore_errors=True)
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(dest)], check=True)
    if not vulkan_headers_usable(include):
        raise BuildError(f"{debs[-1].name} unpacked into {dest} has no vk::LayerSettingEXT")
    log(f"Vulkan headers {vulkan_header_version(include)} unpacked into {include}")
    return include


def unpack_libs(wheel: Path, log=print) -> Path:
    """The wheel's shared libraries (libllama.so, libggml*.so) unpacked into the cache beside it,
    for LLAMA_CPP_LIB_PATH: a second backend's runtime, used without replacing the installed one."""
    import zipfile

    dest = wheel.parent / "lib"
    if not (dest / "libllama.so").exists():
        tmp = wheel.parent / "lib.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                parts = Path(info.filename).parts
                if parts[:2] == ("llama_cpp", "lib") and len(parts) == 3 and ".so" in parts[-1]:
                    (tmp / parts[-1]).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / parts[-1]).write_bytes(z.read(info))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        log(f"unpacked {wheel.name}'s libraries into {dest}")
    return dest
