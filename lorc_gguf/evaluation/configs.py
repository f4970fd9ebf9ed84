"""Which model runs with which cache: model specs (``PATH[@CACHE_K[,CACHE_V]]``, ``smollm2`` for
the embedded model), their checks, the LoRC runtime settings per configuration, and a ``Session``
for each."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import LorcError
from ..format.info import gguf_info, has_latent_keys, hybrid_in_effect, top_k_in_effect
from ..runtime.library import silence_llama_logs
from ..runtime.session import CACHE_TYPES, LORC_SETTINGS, Session, SessionParams

SMOLLM2_ALIAS = "smollm2"
GEMMA3_ALIAS = "gemma3"
QUANTIZED_CACHE_TYPES = tuple(t for t in CACHE_TYPES if t.startswith("q"))
FLASH_ATTN_CHOICES = ("auto", "on", "off")


def resolve_model_path(name: str | os.PathLike[str]) -> Path:
    """A model path; ``smollm2`` names the embedded SmolLM2-135M-Instruct GGUF, ``gemma3`` the
    embedded Gemma-3-270M (assembled once into ~/.cache)."""
    if str(name) == SMOLLM2_ALIAS:
        from ..models import smollm2_path

        return smollm2_path()
    if str(name) == GEMMA3_ALIAS:
        from ..models import gemma3_path

        return gemma3_path()
    p = Path(name)
    if not p.is_file():
        raise LorcError(f"model not found: {p}")
    return p


@dataclass(frozen=True)
class ModelConfig:
    """A model and the cache it runs with. ``flash_attn`` None means auto (on: what llama.cpp's
    auto setting resolves to on CPU, and required by a quantized V cache)."""

    path: Path
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool | None = None
    label: str = ""
    # the LoRC runtime's settings for a LoRC model (None: the file's default, see SessionParams)
    lorc_top_k: int | None = None
    lorc_sink_tokens: int | None = None
    lorc_recent_window: int | None = None
    lorc_attend_rest: int | None = None
    lorc_prefill_block: int | None = None
    # this config's own prompt batch (n_batch = n_ubatch); None: the run's
    n_batch: int | None = None

    @property
    def fa(self) -> bool:
        return True if self.flash_attn is None else self.flash_attn

    @property
    def cache(self) -> str:
        k, v = self.cache_type_k, self.cache_type_v
        return k if k == v else f"{k}/{v}"

    def params(self, n_ctx: int, n_batch: int, threads: int, n_seq_max: int = 1) -> SessionParams:
        # swa_full off, as llama.cpp's programs run: sliding-window layers keep their window and a
        # ubatch of cells, not the context (no effect on models without sliding windows)
        return SessionParams(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_seq_max=n_seq_max, swa_full=False,
                             flash_attn=self.fa, cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v,
                             n_threads=threads, **{name: getattr(self, name) for name in LORC_SETTINGS})

    def describe(self) -> dict[str, Any]:
        sinks, window = hybrid_in_effect(self.path, self.lorc_sink_tokens, self.lorc_recent_window)
        return {"label": self.label, "path": str(self.path), "cache_type_k": self.cache_type_k,
                "cache_type_v": self.cache_type_v, "flash_attn": self.fa,
                "lorc_top_k": top_k_in_effect(self.path, self.lorc_top_k),
                "lorc_sink_tokens": sinks, "lorc_recent_window": window, "lorc_attend_rest": self.lorc_attend_rest,
                "lorc_prefill_block": self.lorc_prefill_block, "n_batch": self.n_batch}


def with_top_k(config: ModelConfig, top_k: int) -> ModelConfig:
    """``config`` with selective reconstruction of ``top_k`` keys per decoded token (0 = all),
    labelled so."""
    label = config.label if top_k == 0 else f"{config.label} [top-{top_k}]"
    return replace(config, label=label, lorc_top_k=top_k)


def with_batch(config: ModelConfig, n_batch: int) -> ModelConfig:
    """``config`` prefilling in batches (and ubatches) of ``n_batch`` tokens whatever the run's,
    labelled so."""
    if n_batch < 1:
        raise LorcError(f"a prompt batch must be at least 1 token, got {n_batch}")
    return replace(config, label=f"{config.label} [ubatch {n_batch}]", n_batch=n_batch)


def check_unique_labels(configs: Sequence[ModelConfig]) -> None:
    labels = [c.label for c in configs]
    if len(set(labels)) != len(labels):
        raise LorcError(f"two configurations share a label: {labels}")


def parse_flash_attn(value: str) -> bool | None:
    if value not in FLASH_ATTN_CHOICES:
        raise LorcError(f"--flash-attn must be one of {', '.join(FLASH_ATTN_CHOICES)}, got '{value}'")
    return None if value == "auto" else value == "on"


def check_cache_type(name: str) -> str:
    if name not in CACHE_TYPES:
        raise LorcError(f"unknown cache type '{name}' (choose from {', '.join(CACHE_TYPES)})")
    return name


def make_config(path: str | os.PathLike[str], cache_type_k: str = "f16", cache_type_v: str = "f16",
                flash_attn: bool | None = None, label: str | None = None) -> ModelConfig:
    """A checked ``ModelConfig``: the file exists, cache types are known, and a quantized V cache
    does not meet an explicit ``flash_attn=False`` (llama.cpp refuses that context)."""
    p = resolve_model_path(path)
    k, v = check_cache_type(cache_type_k), check_cache_type(cache_type_v)
    if flash_attn is False and v in QUANTIZED_CACHE_TYPES:
        raise LorcError(f"llama.cpp needs flash attention for a quantized V cache ({v}); "
                        "use --flash-attn on (or auto)")
    if label is None:
        label = p.stem if k == v == "f16" else f"{p.stem} [{k if k == v else k + '/' + v}]"
    return ModelConfig(p, k, v, flash_attn, label)


def parse_model_spec(spec: str, cache_type_k: str = "f16", cache_type_v: str = "f16",
                     flash_attn: bool | None = None, label: str | None = None) -> ModelConfig:
    """``PATH``, ``PATH@CACHE`` (K and V) or ``PATH@CACHE_K,CACHE_V``; ``smollm2`` for the embedded
    model. Without ``@`` the given default cache types apply."""
    path, sep, cache = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if sep:
        parts = cache.split(",")
        if len(parts) not in (1, 2) or not all(parts):
            raise LorcError(f"bad model spec '{spec}': use PATH@CACHE or PATH@CACHE_K,CACHE_V")
        cache_type_k, cache_type_v = parts[0], parts[-1]
    return make_config(path, cache_type_k, cache_type_v, flash_attn, label)


def open_session(config: ModelConfig, n_ctx: int, n_batch: int, threads: int, n_seq_max: int = 1) -> Session:
    """A ``Session`` for ``config``, refusing a LoRC file on an unpatched runtime with a clear message."""
    from ..runtime import patched as runtime

    silence_llama_logs()
    if gguf_info(config.path)["lorc_version"] > 0:
        try:
            runtime.require_patched_runtime()
        except runtime.RuntimeNotPatched as e:
            raise LorcError(str(e)) from e
    try:
        return Session(config.path, config.params(n_ctx, n_batch, threads, n_seq_max))
    except RuntimeError as e:
        raise LorcError(f"{config.label}: {e}") from e


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def with_settings(configs: Sequence[ModelConfig], settings: dict[str, int]) -> list[ModelConfig]:
    """Every config run with these LoRC runtime settings (an ordinary model ignores them)."""
    return [replace(c, **settings) for c in configs]


def expand_top_k(configs: Sequence[ModelConfig], top_ks: Sequence[int]) -> list[ModelConfig]:
    """Each config with latent keys once per top-k value (in place of itself); the others (the
    original, a --values-only file: nothing to select) unchanged."""
    if not top_ks:
        return list(configs)
    out = []
    for c in configs:
        if has_latent_keys(c.path):
            out += [with_top_k(c, k) for k in top_ks]
        else:
            out.append(c)
    check_unique_labels(out)
    return out
