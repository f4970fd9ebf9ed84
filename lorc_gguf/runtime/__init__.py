"""The runtime stage: building the patched llama-cpp-python (``build``, ``sdist``) and using it
(``patched``: load a GGUF, refusing an unpatched library; ``session``: the low-level driver)."""

from __future__ import annotations

from .patched import RuntimeNotPatched, load, require_patched_runtime, runtime_format_version

__all__ = ["RuntimeNotPatched", "load", "require_patched_runtime", "runtime_format_version"]
