"""Per-architecture knowledge, in one registry: where a model keeps its attention sizes and K/V
weights, which numpy forward computes it for calibration, and what the runtime does differently.

One class per architecture, registered by its GGUF ``general.architecture`` name (the pattern of
``convert_hf_to_gguf.py``). The registry is exactly the architectures whose graph in the patched
runtime opts into the latent cache. The rest of the package asks the class and never branches on
the name, so supporting e.g. qwen2 (K/V biases, kept unchanged) or gemma3 (QK-norm) is one more
class here (with its forward in ``calibration.forward``) plus the runtime's graph opting in.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Protocol

import gguf

from .errors import LorcError
from .format import keys


class Side(str, Enum):
    """Which half of the KV cache a weight feeds."""

    KEY = "key"
    VALUE = "value"


SIDES = (Side.KEY, Side.VALUE)


class Metadata(Protocol):
    """Read access to a GGUF's metadata: ``get`` returns the decoded value or None when absent."""

    def get(self, key: str) -> Any: ...


@dataclass(frozen=True)
class ModelShape:
    """The sizes LoRC needs, per layer where architectures allow them to vary."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer
    head_dim_k: int
    head_dim_v: int
    # RoPE pairs: adjacent rows (2i, 2i+1), llama.cpp's NORM mode, or halves (i, i + n_rot/2), NEOX
    rope_neox: bool = False
    # sliding-window attention (llama.cpp's iswa cache): the window in tokens, 0 when every layer is global
    sliding_window: int = 0
    # per layer: whether it attends only the last ``sliding_window`` positions (empty: none does)
    swa_layers: tuple[bool, ...] = ()

    def is_swa(self, layer: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[layer]

    @property
    def global_layers(self) -> tuple[int, ...]:
        """The layers whose cache grows with the context (every layer without sliding windows)."""
        return tuple(il for il in range(self.n_layer) if not self.is_swa(il))

    def width(self, side: Side, layer: int) -> int:
        """Cache width of one layer's K or V (ggml's ``n_embd_k_gqa(il)`` / ``n_embd_v_gqa(il)``)."""
        head_dim = self.head_dim_k if side is Side.KEY else self.head_dim_v
        return self.n_head_kv[layer] * head_dim

    def widths(self, side: Side) -> tuple[int, ...]:
        return tuple(self.width(side, il) for il in range(self.n_layer))


class Architecture:
    """Defaults follow llama.cpp's generic hparams loading (``llama_model::load_hparams``)."""

    name: ClassVar[str]
    rope_neox: ClassVar[bool] = False  # llama.cpp's rope type for the architecture (llama_model_rope_type)
    # the class of ``calibration.forward`` that computes the architecture in numpy
    forward: ClassVar[str] = "LlamaForward"
    # sliding-window models: every n-th layer is global when the file has no
    # ``{arch}.attention.sliding_window_pattern`` (llama.cpp's load_swa_pattern default)
    swa_period: ClassVar[int] = 0

    def shape(self, meta: Metadata) -> ModelShape:
        n_layer = self._required(meta, gguf.Keys.LLM.BLOCK_COUNT)
        n_embd = self._required(meta, gguf.Keys.LLM.EMBEDDING_LENGTH)
        n_head = self._per_layer(self._required(meta, gguf.Keys.Attention.HEAD_COUNT), n_layer)
        n_head_kv_raw = meta.get(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=self.name))
        # llama.cpp: head_count_kv defaults to head_count (plain multi-head attention)
        n_head_kv = n_head if n_head_kv_raw is None else self._per_layer(n_head_kv_raw, n_layer)
        if len(set(n_head)) != 1 or n_head[0] <= 0:
            raise LorcError(f"{self.name}: per-layer head counts {sorted(set(n_head))} are not supported")
        # llama.cpp: key/value_length default to n_embd / n_head
        default_head_dim = n_embd // n_head[0]
        head_dim_k = meta.get(gguf.Keys.Attention.KEY_LENGTH.format(arch=self.name)) or default_head_dim
        head_dim_v = meta.get(gguf.Keys.Attention.VALUE_LENGTH.format(arch=self.name)) or default_head_dim
        sliding_window = int(meta.get(gguf.Keys.Attention.SLIDING_WINDOW.format(arch=self.name)) or 0)
        swa_layers = self._swa_layers(meta, int(n_layer)) if sliding_window > 0 else ()
        return ModelShape(architecture=self.name, n_layer=int(n_layer), n_embd=int(n_embd),
                          n_head=int(n_head[0]), n_head_kv=tuple(int(h) for h in n_head_kv),
                          head_dim_k=int(head_dim_k), head_dim_v=int(head_dim_v), rope_neox=self.rope_neox,
                          sliding_window=sliding_window if swa_layers else 0, swa_layers=swa_layers)

    def _swa_layers(self, meta: Metadata, n_layer: int) -> tuple[bool, ...]:
        """llama.cpp's ``hparams.is_swa(il)``: the file's pattern (a per-layer array, or a period n
        whose every n-th layer is global, 0 meaning none is), else the architecture's period."""
        pattern = meta.get(f"{self.name}.attention.sliding_window_pattern")
        if isinstance(pattern, (list, tuple)):
            if len(pattern) != n_layer:
                raise LorcError(f"{self.name}: sliding_window_pattern has {len(pattern)} entries, expected {n_layer}")
            return tuple(bool(p) for p in pattern)
        if pattern is None and self.swa_period == 0:
            return ()  # the runtime reads no window for this architecture
        n = int(pattern if pattern is not None else self.swa_period)
        return tuple(n == 0 or il % n < n - 1 for il in range(n_layer))

    def weight_name(self, side: Side, layer: int) -> str:
        """The dense projection that LoRC factorizes, as stored in the GGUF (n_embd -> width)."""
        template = keys.TENSOR_K if side is Side.KEY else keys.TENSOR_V
        return template.format(bid=layer)

    def factor_names(self, side: Side, layer: int) -> tuple[str, str]:
        """(down, up) tensor names replacing ``weight_name`` in a factorized layer."""
        down, up = ((keys.TENSOR_K_DOWN, keys.TENSOR_K_UP) if side is Side.KEY
                    else (keys.TENSOR_V_DOWN, keys.TENSOR_V_UP))
        return down.format(bid=layer), up.format(bid=layer)

    def _required(self, meta: Metadata, key_template: str) -> Any:
        key = key_template.format(arch=self.name)
        value = meta.get(key)
        if value is None:
            raise LorcError(f"{self.name} GGUF lacks the metadata key {key}")
        return value

    @staticmethod
    def _per_layer(value: Any, n_layer: int) -> tuple[int, ...]:
        """Head counts may be one number or a per-layer array (e.g. hybrid models)."""
        if isinstance(value, (list, tuple)):
            if len(value) != n_layer:
                raise LorcError(f"per-layer head count array has {len(value)} entries, expected {n_layer}")
            return tuple(int(v) for v in value)
        return (int(value),) * n_layer


_REGISTRY: dict[str, type[Architecture]] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    _REGISTRY[cls.name] = cls
    return cls


@register
class Llama(Architecture):
    """llama (and everything converted as llama: SmolLM2, Mistral-7B, TinyLlama, ...).

    Optional ``attn_k.bias`` / ``attn_v.bias`` are copied unchanged; the runtime adds them after
    the up-projection, which is exact because the bias does not pass through the factorization.
    """

    name = "llama"


@register
class Qwen2(Architecture):
    """qwen2 (Qwen1.5, Qwen2, Qwen2.5): biases on Q/K/V, which the runtime adds after the
    up-projection (keys) or after attention (values: the weights sum to one); NEOX RoPE."""

    name = "qwen2"
    rope_neox = True


@register
class Gemma3(Architecture):
    """gemma3 (Gemma 3 text models): an RMS norm on every key head before RoPE, which the runtime
    applies to the rebuilt keys (up-projection, norm, then RoPE, as the dense graph orders them);
    five sliding-window layers to one global layer, each kind keeping its latent rows in its own
    half of llama.cpp's iswa cache; NEOX RoPE (calibration: ``calibration.forward.Gemma3Forward``)."""

    name = "gemma3"
    rope_neox = True
    forward = "Gemma3Forward"
    swa_period = 6  # llama_model_gemma3: load_swa_pattern(ml, 6)


def registered() -> tuple[str, ...]:
    """The supported architectures, in the order they were registered."""
    return tuple(_REGISTRY)


def for_name(name: str) -> Architecture:
    """The architecture class for ``general.architecture``; only ones the runtime supports."""
    if name not in _REGISTRY:
        raise LorcError(f"unsupported architecture '{name}' (supported: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]()
