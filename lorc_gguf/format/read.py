"""Reading a GGUF (the converter's stage 1): open it memory-mapped and hand out its K/V weights
one at a time in float64."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.gguf_reader import ReaderField, ReaderTensor

from ..arch import SIDES, Architecture, ModelShape, Side, for_name
from ..errors import LorcError
from . import keys

GGUF_MAGIC = b"GGUF"

# Tensor types read without rounding: everything else is "quantized" for the user notice.
FLOAT_TYPES = frozenset({gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                         gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.F64})


class FastGGUFReader(gguf.GGUFReader):
    """GGUFReader that parses metadata ~10x faster, with the same fields and tensors.

    The stock reader slices its ``np.memmap`` for every value, paying memmap bookkeeping and an
    enum lookup per element; a tokenizer is ~100k strings, so opening SmolLM2 took 3+ s, and every
    test model carries that tokenizer. Here slices come from a plain ndarray view of the same map
    and arrays of strings/scalars are walked in one loop; the resulting ``ReaderField`` parts, data
    indices and types are identical (tests compare both readers on SmolLM2). Tensor data stay views
    into the map. Overrides private methods of the pinned gguf==0.19.0 (see pyproject.toml).
    """

    def _plain(self) -> np.ndarray:
        plain = self.__dict__.get("_plain_data")
        if plain is None:
            plain = self.__dict__["_plain_data"] = self.data.view(np.ndarray)
        return plain

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        dt = np.dtype(dtype)
        arr = self._plain()[offset:offset + dt.itemsize * int(count)].view(dt)
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(dt.newbyteorder(order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        plain = self._plain()
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n = gguf.GGUFValueType(int(raw_itype[0])), int(alen[0])
        offs = orig_offs + 12
        parts: list[np.ndarray] = [raw_itype, alen]
        if itype == gguf.GGUFValueType.STRING:
            view = plain.data  # a memoryview: int.from_bytes on its slices is cheap
            for _ in range(n):
                slen = int.from_bytes(view[offs:offs + 8], "little")
                parts.append(plain[offs:offs + 8].view(np.uint64))
                parts.append(plain[offs + 8:offs + 8 + slen])
                offs += 8 + slen
            data_idxs = list(range(3, 2 + 2 * n, 2))
        elif itype in self.gguf_scalar_to_np:
            dt = np.dtype(self.gguf_scalar_to_np[itype])
            bulk = plain[offs:offs + dt.itemsize * n].view(dt)
            parts += [bulk[i:i + 1] for i in range(n)]
            offs += dt.itemsize * n
            data_idxs = list(range(2, 2 + n))
        else:  # nested arrays: the stock (recursive) path
            return super()._get_field_parts(orig_offs, raw_type)
        types = [gguf.GGUFValueType.ARRAY] + ([itype] if n else [])
        return offs - orig_offs, parts, data_idxs, types


def is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


class ReaderMetadata:
    """``arch.Metadata`` over a GGUFReader: decoded scalar/array values by key."""

    def __init__(self, reader: gguf.GGUFReader) -> None:
        self._fields = reader.fields

    def get(self, key: str) -> Any:
        f = self._fields.get(key)
        return None if f is None else f.contents()

    def field(self, key: str) -> ReaderField | None:
        return self._fields.get(key)


@dataclass
class SourceModel:
    """An opened input GGUF. Tensor data stays in the memory map until a stage asks for it."""

    path: Path
    reader: gguf.GGUFReader
    architecture: Architecture
    shape: ModelShape
    meta: ReaderMetadata
    tensors: dict[str, ReaderTensor] = field(repr=False)

    def weight_tensor(self, side: Side, layer: int) -> ReaderTensor:
        return self.tensors[self.architecture.weight_name(side, layer)]

    def weight(self, side: Side, layer: int) -> np.ndarray:
        """One layer's K or V projection dequantized to float64, numpy shape (width, n_embd).

        Row j is output channel j in GGUF order (for llama already permuted for RoPE by the
        HF converter), which is the order the factor ``up`` keeps.
        """
        t = self.weight_tensor(side, layer)
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise LorcError(f"{t.name}: cannot dequantize tensor type {t.tensor_type.name}") from None
        return np.asarray(w, dtype=np.float64).reshape(self.shape.width(side, layer), self.shape.n_embd)

    def iter_weights(self) -> Iterator[tuple[Side, int, np.ndarray]]:
        """All K/V weights, one at a time, so memory never holds more than one dequantized matrix."""
        for layer in range(self.shape.n_layer):
            for side in SIDES:
                yield side, layer, self.weight(side, layer)

    def quantized_weight_types(self) -> list[str]:
        """Names of the non-float types among the K/V weights (for the 'dequantized' notice)."""
        types = {self.weight_tensor(side, il).tensor_type for side in SIDES for il in range(self.shape.n_layer)}
        return sorted(t.name for t in types - FLOAT_TYPES)


def open_gguf(path: Path) -> SourceModel:
    """Open and validate a GGUF as LoRC input; every refusal is a one-line ``LorcError``."""
    if not is_gguf_file(path):
        raise LorcError(f"{path} is not a GGUF file (nor a Hugging Face safetensors folder)")
    try:
        reader = FastGGUFReader(path, "r")
    except (ValueError, OSError) as e:
        raise LorcError(f"{path}: unreadable GGUF ({e})") from None
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise LorcError(f"{path}: big-endian GGUF files are not supported")
    meta = ReaderMetadata(reader)
    if meta.field(keys.KEY_VERSION) is not None:
        raise LorcError(f"{path} is already LoRC-converted ({keys.KEY_VERSION} = "
                        f"{meta.get(keys.KEY_VERSION)}); convert the original model instead")
    arch_name = meta.get(gguf.Keys.General.ARCHITECTURE)
    if arch_name is None:
        raise LorcError(f"{path}: no {gguf.Keys.General.ARCHITECTURE} in the metadata")
    architecture = for_name(arch_name)
    shape = architecture.shape(meta)
    model = SourceModel(path=path, reader=reader, architecture=architecture, shape=shape, meta=meta,
                        tensors={t.name: t for t in reader.tensors})
    _check_weights(model)
    return model


def _check_weights(model: SourceModel) -> None:
    """Every layer must have dense K and V weights of the shape the metadata promises."""
    shape = model.shape
    for layer in range(shape.n_layer):
        for side in SIDES:
            name = model.architecture.weight_name(side, layer)
            t = model.tensors.get(name)
            if t is None:
                raise LorcError(f"{model.path}: tensor {name} is missing")
            # reader shapes are ggml order: [n_embd, width]
            expected = (shape.n_embd, shape.width(side, layer))
            got = tuple(int(d) for d in t.shape)
            if got != expected:
                raise LorcError(f"{name} has ggml shape {list(got)}, metadata implies {list(expected)}")
