"""Build and install the LoRC-patched llama-cpp-python into the active environment.

    python tools/build_runtime.py               # CPU build, cached
    python tools/build_runtime.py --cuda        # -DGGML_CUDA=ON
    python tools/build_runtime.py --cuda --cuda-arch 90 --lib-dir   # one GPU generation, libraries for LLAMA_CPP_LIB_PATH
    python tools/build_runtime.py --vulkan --lib-dir   # Vulkan build, its libraries for LLAMA_CPP_LIB_PATH
    python tools/build_runtime.py --fetch-vulkan-headers   # Debian 13's Vulkan headers into the cache
    python tools/build_runtime.py --check       # only check that both series apply to the pin
    python tools/build_runtime.py --tools       # also build llama-perplexity, llama-bench, ...
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..runtime import build, sdist
from .common import fail


def build_runtime_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda", action="store_true", help="build the CUDA backend (-DGGML_CUDA=ON)")
    ap.add_argument("--cuda-arch", default=None, metavar="LIST",
                    help="CMAKE_CUDA_ARCHITECTURES for --cuda, e.g. 90 (H100/H200) or 86;89 (default: ggml-cuda's list "
                         "of every generation)")
    ap.add_argument("--vulkan", action="store_true", help="build the Vulkan backend (-DGGML_VULKAN=ON)")
    ap.add_argument("--vulkan-include", type=Path, default=None, metavar="DIR",
                    help="Vulkan headers to build with (default: $VULKAN_SDK/include, the fetched ones, /usr/include)")
    ap.add_argument("--fetch-vulkan-headers", action="store_true",
                    help="download Debian 13's libvulkan-dev headers into the cache (apt-get download), then exit")
    ap.add_argument("--lib-dir", action="store_true",
                    help="do not install: unpack the wheel's libraries into the cache and print that folder "
                         "(for LLAMA_CPP_LIB_PATH)")
    ap.add_argument("--metal", action="store_true", help="build the Metal backend (-DGGML_METAL=ON)")
    ap.add_argument("--cmake-arg", action="append", default=[], metavar="-DNAME=VALUE",
                    help="extra CMake flag, repeatable")
    ap.add_argument("--jobs", "-j", type=int, default=None, help="parallel compile jobs")
    ap.add_argument("--force", action="store_true", help="rebuild even if a cached wheel matches")
    ap.add_argument("--check", action="store_true", help="only check that both series apply, then exit")
    ap.add_argument("--tools", action="store_true", help="also build llama.cpp's programs from the patched tree")
    ap.add_argument("--no-install", action="store_true", help="build (or find) the wheel, do not install it")
    ap.add_argument("--amx", choices=("auto", "on", "off"), default="auto",
                    help="AMX under -march=native: auto (default) builds without it where the CPU reports "
                         "AMX but cannot run it, as in some virtual machines")
    args = ap.parse_args(argv)
    # with --lib-dir stdout carries the folder alone
    log = (lambda m: print(m, file=sys.stderr)) if args.lib_dir else print

    options = build.BuildOptions(cmake_args=args.cmake_arg,
                                 shortcuts=[s for s in ("cuda", "metal", "vulkan") if getattr(args, s)],
                                 force=args.force)
    if args.jobs:
        options.jobs = args.jobs
    if args.amx == "off":
        options.compiler_flags = build.NO_AMX_FLAGS
    elif args.amx == "auto" and not args.check:
        options.compiler_flags = build.native_compiler_flags(log)
    try:
        if args.fetch_vulkan_headers:
            build.fetch_vulkan_headers(log)
            return 0
        if args.cuda:
            options.cmake_args = [*build.cuda_cmake_args(args.cuda_arch), *options.cmake_args]
        if args.vulkan:
            options.cmake_args = [*build.vulkan_cmake_args(args.vulkan_include, log), *options.cmake_args]
        series = build.read_runtime_series()
        if args.check:
            with tempfile.TemporaryDirectory() as tmp:
                build.patched_tree(series, Path(tmp) / "src")
            counts = " + ".join(f"{len(s.patches)} ({s.directory.name})" for s in series)
            print(f"ok: {counts} patches apply to llama-cpp-python {sdist.read_pin().version}")
            return 0
        wheel = build.build_wheel(options, log)
        if args.lib_dir:
            print(build.unpack_libs(wheel, log))
            return 0
        if not args.no_install:
            build.install_wheel(wheel)
        if args.tools:
            build.build_tools(options)
    except (build.BuildError, sdist.SdistError) as e:
        return fail(str(e))
    return 0
