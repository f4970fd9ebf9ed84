"""Loader fuzzing: hundreds of damaged copies of a small LoRC GGUF (tests/fuzz_gguf.py) go through
the patched llama.cpp, each in a child process so that a crash cannot take pytest down. Every
mutant must end as a clean load error or as a successful load that decodes; none may crash.

One parametrized item per mutant, so a crash names its mutation; the loads themselves run once per
module (in chunks: build ~40 mutants, load them in one child, delete them).
"""

from __future__ import annotations

import collections
import contextlib
import re
import time

import pytest

import fuzz_gguf
import synth
from lorc_gguf import convert

pytest.importorskip("llama_cpp")

SPEC_PLAIN = fuzz_gguf.Spec(arch="llama", n_layer=2, n_embd=128, width=128, key_ranks=(64, 64),
                            value_ranks=(64, 64), hybrid=False)
SPEC_HYBRID = fuzz_gguf.Spec(**{**SPEC_PLAIN.__dict__, "hybrid": True})
VARIANTS = {
    "plain": (SPEC_PLAIN, {}, 0),
    "hybrid": (SPEC_HYBRID, {"sink_tokens": 4, "recent_window": 16}, 1),
}
MUTANTS = {variant: fuzz_gguf.generate(spec, seed=seed, tag=variant) for variant, (spec, _, seed) in VARIANTS.items()}
ALL = [(variant, m) for variant, mutants in MUTANTS.items() for m in mutants]
CHUNK = 40

# Two kinds of mutant crashed the first version of the loader and are now refused or run:
#  - a K/V weight (factor, or the hybrid's exact attn_k/attn_v) stored as F64/I8/I16/I32 segfaulted in
#    the first llama_decode (as upstream does for an ordinary attn_k of those types): the LoRC loader
#    now refuses types ggml_mul_mat cannot take, so these must be load errors.
#  - attn_v_up stored as Q4_0 (what llama_model_quantize(..., Q4_0) writes) aborted in the CPU repack
#    path, whose kernels take only 2-D weights while the per-head lift views v_up as 3-D: v_up now
#    selects its buffer without repacking.
def expected_outcome(mutant: fuzz_gguf.Mutant) -> str | None:
    if re.search(r"-type-.*-(f64|i8|i16|i32)$", mutant.name):
        return fuzz_gguf.LOAD_ERROR
    return mutant.expect


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, request) -> dict[str, dict]:
    d = tmp_path_factory.mktemp("fuzz")
    # f16 weights: half the bytes of f32 for every one of the ~400 mutant files, same loader paths
    src = synth.make_llama_gguf(d / "source.gguf", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, head_dim=64,
                                n_ff=256, dtype="f16")
    bases = {}
    for variant, (spec, extra, _) in VARIANTS.items():
        path = d / f"{variant}.gguf"
        convert(src, path, allocation="uniform", ratio=0.5, outtype="f16", progress=False, data_free=True, **extra)
        assert fuzz_gguf.spec_of(path) == spec, "the mutant recipes assume this file layout"
        bases[variant] = fuzz_gguf.Base(path, src)

    started = time.perf_counter()
    results: dict[str, dict] = {}
    work = d / "mutants"
    work.mkdir()
    # build a chunk of mutants, load them all in child processes, delete them: bounded disk use
    for start in range(0, len(ALL), CHUNK):
        chunk = ALL[start:start + CHUNK]
        paths = []
        for variant, mutant in chunk:
            path = work / f"{mutant.name}.gguf"
            mutant.build(bases[variant], path)
            paths.append(path)
        loaded = fuzz_gguf.load_in_children(paths)
        for (_, mutant), path in zip(chunk, paths):
            results[mutant.name] = loaded[str(path)]
            path.unlink(missing_ok=True)

    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for _, mutant in ALL:
        by_kind[mutant.kind][results[mutant.name]["outcome"]] += 1
    lines = [f"fuzz: {len(ALL)} mutants in {time.perf_counter() - started:.0f} s"]
    lines += [f"  {kind:18s} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
              for kind, c in sorted(by_kind.items())]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        for line in lines:
            (reporter.write_line if reporter else print)(line)
    return results


def test_enough_mutants():
    assert len(ALL) >= 200
    kinds = {m.kind for _, m in ALL}
    assert {"version", "rank-array", "rank-value", "hybrid-defaults", "shape", "dropped", "swapped", "factor-type",
            "duplicated-dense", "truncated", "byte-flip"} <= kinds


@pytest.mark.parametrize("mutant", [m for _, m in ALL], ids=[m.name for _, m in ALL])
def test_mutant_loads_or_is_refused(outcomes, mutant: fuzz_gguf.Mutant):
    record = outcomes[mutant.name]
    detail = f"{mutant.description}: {record}"
    assert record["outcome"] not in (fuzz_gguf.CRASH, fuzz_gguf.HANG), detail
    # llama_decode may refuse a batch (a non-zero status), which is not a crash either
    assert record["outcome"] in (fuzz_gguf.LOADED, fuzz_gguf.LOAD_ERROR, "decode_error"), detail
    expect = expected_outcome(mutant)
    if expect is not None:
        assert record["outcome"] == expect, detail
