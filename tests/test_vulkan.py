"""LoRC graphs on the Vulkan backend against the CPU backend of the same library
(tests/backend_cases.py: latent, flash attention, q8_0 latent cache, exact sinks and window with and
without prompt query blocks, top-k selection, qwen2 and gemma3 call sites).

Runs only against a Vulkan build: ``make test-vulkan`` builds it (tools/build_runtime.py --vulkan
--lib-dir) and runs this file with ``LLAMA_CPP_LIB_PATH`` set to its libraries and
``GGML_VK_VISIBLE_DEVICES=0``, which lets ggml-vulkan use a CPU-type device such as Mesa's lavapipe.
With any other runtime (``make test``) every test here is skipped.

``python tests/test_vulkan.py`` (same environment) prints the table of results/vulkan.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if __name__ == "__main__":  # run as a script: the same imports as under pytest
    sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import backend_cases as bc  # noqa: E402


def vulkan_devices() -> list[str]:
    """The Vulkan devices of the runtime LLAMA_CPP_LIB_PATH names ([] without one)."""
    lib_dir = os.environ.get("LLAMA_CPP_LIB_PATH")
    if not lib_dir:
        return []  # the installed (CPU) runtime of `make test`
    try:
        import llama_cpp  # noqa: F401  (loads libllama and libggml from LLAMA_CPP_LIB_PATH)
    except Exception:
        return []
    return [d for d in bc.gpu_devices(lib_dir) if d.lower().startswith("vulkan")]


if __name__ != "__main__" and not vulkan_devices():
    pytest.skip("needs the Vulkan runtime and a Vulkan device: make test-vulkan", allow_module_level=True)


# Ops of LoRC graphs that the pinned ggml-vulkan leaves to the CPU beyond the dense graph's own,
# per case, each with its patch, cost and remedy in results/vulkan.md. A new one fails
# test_no_new_cpu_fallbacks.
KNOWN_FALLBACKS: dict[str, set[tuple[str, str]]] = {}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> bc.Comparison:
    return bc.Comparison(bc.make_models(tmp_path_factory.mktemp("vulkan")))


@pytest.mark.parametrize("case", bc.DENSE_CASES)
def test_dense_models_agree(comparison, case):
    # the original models, no LoRC code: ggml-vulkan's own difference from the CPU, the baseline of
    # every tolerance. Measured on lavapipe (results/vulkan.md): 2.1e-3 (llama, f16 cache), 4.7e-3
    # (q8_0 K cache), 3.5e-3 (qwen2), 1.2e-2 (gemma3).
    # 5e-2 only guards the baseline against a broken device: the paths a wrong graph could take
    # are 0.86-0.92 apart (test_the_paths_are_distinct)
    diff, _ = comparison.measure(case)
    assert diff < 5e-2


@pytest.mark.parametrize("case", bc.LORC_CASES)
def test_vulkan_logits_match_the_cpu(comparison, case):
    diff, _ = comparison.measure(case)
    tol = comparison.tolerance(case)
    assert diff <= tol, f"{case}: Vulkan vs CPU {diff:.2e} > {tol:.2e} (TOLERANCE_FACTOR x its dense model's)"


def test_the_paths_are_distinct(comparison):
    # a Vulkan graph that took the plain latent path instead of the exact window, or every key
    # instead of the selection, would be this far from the CPU's: far above every tolerance
    for what, diff in comparison.distinct_paths().items():
        assert diff > 100 * comparison.tolerance("hybrid"), what


@pytest.mark.parametrize("case", bc.LORC_CASES)
def test_no_new_cpu_fallbacks(comparison, case):
    extra = comparison.new_cpu_ops(case) - KNOWN_FALLBACKS.get(case, set())
    assert not extra, f"{case}: ops on the CPU that the dense graph runs on Vulkan: {sorted(extra)}"


if __name__ == "__main__":
    import tempfile

    if not vulkan_devices():
        sys.exit("error: no Vulkan device in the loaded runtime: set LLAMA_CPP_LIB_PATH to a Vulkan build's libraries "
                 "(tools/build_runtime.py --vulkan --lib-dir) and GGML_VK_VISIBLE_DEVICES=0")
    print("devices:", ", ".join(vulkan_devices()))
    with tempfile.TemporaryDirectory() as tmp:
        c = bc.Comparison(bc.make_models(Path(tmp)))
        print(c.markdown())
        print("\ndistinct paths on the CPU:", {k: f"{v:.3f}" for k, v in c.distinct_paths().items()})
