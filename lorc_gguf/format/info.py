"""The one reader of a GGUF's LoRC metadata: format version, ranks, the runtime defaults a file
carries, and the dense cache widths they compare against (cached per file version)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import gguf

from .. import arch
from ..arch import Side
from ..errors import LorcError
from . import keys
from .read import FastGGUFReader, ReaderMetadata


def read_lorc(meta: arch.Metadata, architecture: str) -> dict[str, Any]:
    """The LoRC keys of one file's metadata: ``lorc_version`` (0 for an ordinary model),
    ``allocation``, ``method``, ``key_rank``/``value_rank`` (None when absent) and the runtime
    defaults ``sink_tokens``, ``recent_window``, ``decode_top_k`` (0 when absent)."""

    def count(key: str) -> int:
        return int(meta.get(key) or 0)

    def ranks(key: str) -> list[int] | None:
        value = meta.get(key)
        return None if value is None else [int(r) for r in value]

    return {"lorc_version": count(keys.KEY_VERSION),
            "allocation": meta.get(keys.KEY_ALLOCATION),
            "method": meta.get(keys.KEY_METHOD),
            "key_rank": ranks(keys.key_rank_key(architecture)),
            "value_rank": ranks(keys.value_rank_key(architecture)),
            "sink_tokens": count(keys.KEY_SINK_TOKENS),
            "recent_window": count(keys.KEY_RECENT_WINDOW),
            "decode_top_k": count(keys.KEY_DECODE_TOP_K)}


@functools.lru_cache(maxsize=64)
def _gguf_info(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    try:
        reader = FastGGUFReader(path, "r")  # ~10x faster than gguf.GGUFReader on a 49k-token vocabulary
    except Exception as e:
        raise LorcError(f"{path} is not a readable GGUF file ({e})") from e
    meta = ReaderMetadata(reader)
    name = meta.get(gguf.Keys.General.ARCHITECTURE) or ""
    key_width = value_width = None
    sliding_window, n_global = 0, None
    if name in arch.registered():
        try:
            shape = arch.for_name(name).shape(meta)
            key_width, value_width = shape.width(Side.KEY, 0), shape.width(Side.VALUE, 0)
            sliding_window, n_global = shape.sliding_window, len(shape.global_layers)
        except LorcError:
            pass
    block_count = meta.get(gguf.Keys.LLM.BLOCK_COUNT.format(arch=name))
    n_ctx_train = meta.get(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=name))
    return {"arch": name,
            "n_layer": None if block_count is None else int(block_count),
            "n_ctx_train": None if n_ctx_train is None else int(n_ctx_train),
            "key_width": key_width,
            "value_width": value_width,
            "sliding_window": sliding_window,
            "n_global_layers": n_global,
            **read_lorc(meta, name)}


def gguf_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the tools read from a GGUF's metadata (cached per file version): ``arch``, ``n_layer``,
    ``n_ctx_train``, the ``read_lorc`` fields (``lorc_version`` 0 and ranks None for an ordinary
    model) and the dense ``key_width``/``value_width`` of a layer (n_head_kv * head_dim; None for an
    architecture outside the registry), ``sliding_window`` (0 without) and ``n_global_layers``
    (the layers whose cache grows with the context, which hold the exact cells; None outside the registry)."""
    st = os.stat(path)
    return dict(_gguf_info(str(Path(path).resolve()), st.st_mtime_ns, st.st_size))


def gguf_lorc_version(path: str | os.PathLike[str]) -> int:
    """lorc.version of a GGUF file, 0 for an ordinary model."""
    return gguf_info(path)["lorc_version"]


def _runtime_default(path: str | os.PathLike[str], key: str, value: int | None) -> int:
    """A runtime setting as the runtime resolves it for a context: ``value`` (the context
    parameter), or the file's ``key`` (a gguf_info field) for None; 0 for an ordinary model."""
    info = gguf_info(path)
    if not info["lorc_version"]:
        return 0
    return info[key] if value is None else int(value)


def hybrid_in_effect(path: str | os.PathLike[str], sink_tokens: int | None = None,
                     recent_window: int | None = None) -> tuple[int, int]:
    """(sink tokens, recent window) of the exact window the runtime gives a file: the settings
    passed, or for None the file's lorc.sink_tokens / lorc.recent_window; (0, 0) for a plain latent
    cache or an ordinary model."""
    return (_runtime_default(path, "sink_tokens", sink_tokens),
            _runtime_default(path, "recent_window", recent_window))


def top_k_in_effect(path: str | os.PathLike[str], top_k: int | None = None) -> int:
    """The selective-reconstruction k the runtime gives a file's decoded tokens: ``top_k``, or for
    None the file's lorc.decode_top_k; 0 (every key) for an ordinary model."""
    return _runtime_default(path, "decode_top_k", top_k)


def lorc_ranks(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``{"arch", "key_rank", "value_rank", "key_width", "value_width"}`` of a LoRC GGUF, None for
    an ordinary model."""
    info = gguf_info(path)
    if not info["lorc_version"] or info["key_rank"] is None:
        return None
    return {k: info[k] for k in ("arch", "key_rank", "value_rank", "key_width", "value_width")}


def has_latent_keys(path: str | os.PathLike[str]) -> bool:
    """Whether a GGUF caches latent keys in some layer (a rank equal to the width is a dense layer)."""
    info = gguf_info(path)
    return bool(info["lorc_version"] and info["key_rank"]
                and any(0 < r < (info["key_width"] or 0) for r in info["key_rank"]))

