"""The build step's choices that do not need a compiler run of llama.cpp: the AMX decision and
the wheel cache key."""

from __future__ import annotations

import shutil

import pytest

from lorc_gguf.runtime import build


def test_amx_is_switched_off_only_where_it_is_claimed_but_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    for reports, runs, expected in [(True, False, build.NO_AMX_FLAGS), (True, True, ""), (False, False, "")]:
        monkeypatch.setattr(build, "cpu_reports_amx", lambda reports=reports: reports)
        monkeypatch.setattr(build, "amx_runs", lambda runs=runs: runs)
        assert build.native_compiler_flags(log=lambda *_: None) == expected


def test_no_amx_flags_win_over_march_native() -> None:
    """-march=native followed by nothing, preceded by -mno-amx-*: GCC must not define __AMX_INT8__
    (the macro that compiles ggml's AMX backend in)."""
    import shutil
    import subprocess
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    out = subprocess.run([cc, *build.NO_AMX_FLAGS.split(), "-march=native", "-dM", "-E", "-"], input="",
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"{cc} does not take the AMX flags: {out.stderr.strip()[:200]}")
    assert "__AMX_INT8__" not in out.stdout and "__AMX_TILE__" not in out.stdout


def test_cache_key_changes_with_compiler_flags() -> None:
    series = build.read_runtime_series()
    plain = build.BuildOptions()
    no_amx = build.BuildOptions(compiler_flags=build.NO_AMX_FLAGS)
    assert build.cache_key(series, plain) != build.cache_key(series, no_amx)
    assert build.cache_key(series, plain) == build.cache_key(series, build.BuildOptions())


def test_both_series_feed_the_cache_key() -> None:
    # the llama.cpp series applies inside vendor/llama.cpp, the bindings series at the sdist root;
    # a change to either must give another wheel
    runtime, bindings = build.read_runtime_series()
    assert (runtime.target, bindings.target) == ("vendor/llama.cpp", ".")
    assert runtime.patches and bindings.patches
    options = build.BuildOptions()
    key = build.cache_key((runtime, bindings), options)
    assert build.cache_key((runtime, build.Series(bindings.directory, bindings.patches[:-1], ".")), options) != key
    assert build.cache_key((build.Series(runtime.directory, runtime.patches[:-1]), bindings), options) != key


def test_tool_targets_are_defined_under_the_tools_flags() -> None:
    """Every program ``build_tools`` asks CMake for is defined by a tools/ folder that the pinned
    tree adds under the flags build_tools passes: asking for an undefined target fails the whole
    build ("No rule to make target 'llama-cli'" when llama-cli was asked for without
    LLAMA_BUILD_SERVER). Folders behind a switch that is off (GGML_METAL here) do not count."""
    import re

    from lorc_gguf.runtime import build, sdist
    tools = sdist.vendored_llama_cpp(log=lambda *_: None) / "tools"
    listing = (tools / "CMakeLists.txt").read_text()
    on = {a[2:].split("=")[0] for a in build.TOOL_CMAKE_ARGS if a.endswith("=ON")}
    hidden = set()
    for switch in ("LLAMA_BUILD_SERVER", "GGML_RPC", "GGML_METAL"):
        block = re.search(rf"if \({switch}\)(.*?)endif\(\)", listing, re.S)
        assert block is not None, switch
        if switch not in on:
            hidden |= set(re.findall(r"add_subdirectory\((\S+)\)", block.group(1)))
    added = set(re.findall(r"add_subdirectory\((\S+)\)", listing)) - hidden
    defined = {name: folder for folder in added
               for name in re.findall(r"set\(TARGET (\S+)\)", (tools / folder / "CMakeLists.txt").read_text())}
    assert {"llama-server", "ggml-rpc-server"} <= set(build.TOOL_TARGETS)
    assert set(build.TOOL_TARGETS) <= set(defined), set(build.TOOL_TARGETS) - set(defined)


def _fake_vulkan_headers(root, version: int, layer_settings: bool):
    inc = root / "include"
    (inc / "vulkan").mkdir(parents=True)
    (inc / "vulkan" / "vulkan_core.h").write_text(f"#define VK_HEADER_VERSION {version}\n")
    (inc / "vulkan" / "vulkan_structs.hpp").write_text("struct LayerSettingEXT\n{\n};\n" if layer_settings else "\n")
    return inc


def test_vulkan_headers_are_judged_by_what_ggml_vulkan_uses(tmp_path):
    old = _fake_vulkan_headers(tmp_path / "old", 239, layer_settings=False)
    new = _fake_vulkan_headers(tmp_path / "new", 309, layer_settings=True)
    assert build.vulkan_header_version(old) == 239
    assert not build.vulkan_headers_usable(old)
    assert build.vulkan_headers_usable(new)
    if shutil.which("glslc") is None or not build._spirv_headers_found():
        with pytest.raises(build.BuildError, match="apt-get install"):
            build.vulkan_cmake_args(new, log=lambda m: None)
        return
    assert build.vulkan_cmake_args(new, log=lambda m: None) == [f"-DVulkan_INCLUDE_DIR={new}"]
    with pytest.raises(build.BuildError, match=r"too old.*\(239\).*--fetch-vulkan-headers"):
        build.vulkan_cmake_args(old, log=lambda m: None)


def test_cuda_builds_without_the_driver_library_where_there_is_none(tmp_path, monkeypatch):
    # a toolkit without libcuda.so (no GPU driver, no link stub, as on the machines without a GPU):
    # ggml-cuda's VMM pool would need CUDA::cuda_driver, so the legacy pool is built
    monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: type("P", (), {"stdout": ""})())
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    wrapper = tmp_path / "nvcc"  # a wrapper script naming the real nvcc, as /usr/local/bin/nvcc here
    wrapper.write_text(f"#!/bin/sh\nexec {nvcc} \"$@\"\n")
    assert not build.has_cuda_driver_library(nvcc) and not build.has_cuda_driver_library(wrapper)
    (toolkit / "lib64" / "stubs").mkdir(parents=True)
    (toolkit / "lib64" / "stubs" / "libcuda.so").write_text("")
    assert build.has_cuda_driver_library(nvcc) and build.has_cuda_driver_library(wrapper)
