"""lorc-gguf: LoRC (low-rank compressed KV cache) for GGUF models.

``convert(src, dst, **options)`` factorizes each layer's K/V projections by truncated SVD and
writes a GGUF that the patched llama.cpp runtime (``patches/llama.cpp``) runs with a latent cache.
"""

from __future__ import annotations

from .converter.pipeline import ConvertOptions, convert
from .errors import LorcError

__all__ = ["ConvertOptions", "LorcError", "convert"]
