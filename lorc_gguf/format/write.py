"""Writing a GGUF (the converter's stage 5): GGUFWriter, streaming one tensor at a time.

Copied tensors go from the input's memory map to the output unchanged (same type, same bytes);
new tensors are produced on demand by a callable, so only one layer's factors exist at a time.
The file is written next to its destination under a temporary name and renamed into place with
``os.replace`` at the end, so the destination is never a half-written GGUF.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.gguf_reader import ReaderField, ReaderTensor
from tqdm import tqdm

QT = gguf.GGMLQuantizationType


def storage_shape(shape: tuple[int, int], qtype: QT) -> tuple[int, ...]:
    """Numpy shape of the encoded array (bytes per row for block-quantized types)."""
    if qtype in (QT.F32, QT.F16):
        return shape
    return gguf.quant_shape_to_byte_shape(shape, qtype)


def storage_nbytes(shape: tuple[int, int], qtype: QT) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, row_len = shape
    return rows * (row_len // block_size) * type_size


VT = gguf.GGUFValueType


@dataclass(frozen=True)
class MetadataItem:
    key: str
    value: Any
    vtype: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


@dataclass(frozen=True)
class CopiedTensor:
    """An input tensor written back byte for byte."""

    source: ReaderTensor

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def nbytes(self) -> int:
        return int(self.source.n_bytes)


@dataclass(frozen=True)
class NewTensor:
    """A tensor computed while writing. ``shape`` is numpy order (rows, row length)."""

    name: str
    shape: tuple[int, int]
    qtype: gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return storage_nbytes(self.shape, self.qtype)


OutputTensor = CopiedTensor | NewTensor


def _raw_string(field: ReaderField, part_index: int) -> bytes:
    # strings are copied as bytes, not decoded and re-encoded, so any byte sequence survives
    return bytes(field.parts[part_index])


def copy_metadata(reader: gguf.GGUFReader, skip: Iterable[str] = ()) -> list[MetadataItem]:
    """Every key/value of the input in file order, except GGUF.* bookkeeping that GGUFWriter
    writes itself (and ``general.architecture``, which its constructor adds first)."""
    skipped = set(skip) | {gguf.Keys.General.ARCHITECTURE}
    items: list[MetadataItem] = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skipped:
            continue
        vtype = field.types[0]
        if vtype == VT.STRING:
            items.append(MetadataItem(field.name, _raw_string(field, -1), vtype))
        elif vtype == VT.ARRAY:
            sub_type = field.types[-1]
            if len(field.types) > 2:
                raise ValueError(f"nested metadata arrays are not supported ({field.name})")
            if sub_type == VT.STRING:
                value: Any = [_raw_string(field, i) for i in field.data]
            else:
                value = field.contents()
            items.append(MetadataItem(field.name, value, vtype, sub_type))
        else:
            items.append(MetadataItem(field.name, field.contents(), vtype))
    return items


def temp_path_beside(dst: Path) -> Path:
    """A new empty file next to ``dst`` (same filesystem, so ``os.replace`` is atomic), created
    with the usual 0666-minus-umask permissions (``mkstemp`` would make it private)."""
    for attempt in range(100):
        tmp = dst.parent / f".{dst.name}.{os.getpid()}.{attempt}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {dst}")


def write_gguf(dst: Path, architecture: str, metadata: Sequence[MetadataItem], tensors: Sequence[OutputTensor],
               *, alignment: int | None = None, progress: bool = True) -> None:
    """Write ``metadata`` and ``tensors`` (in this order) to ``dst`` atomically."""
    dst = Path(dst)
    tmp = temp_path_beside(dst)
    writer = gguf.GGUFWriter(tmp, architecture)
    try:
        if alignment is not None:
            writer.data_alignment = alignment
        for item in metadata:
            writer.add_key_value(item.key, item.value, item.vtype, sub_type=item.sub_type)
        for t in tensors:
            if isinstance(t, CopiedTensor):
                data = t.source.data
                writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.source.tensor_type)
            else:
                shape = storage_shape(t.shape, t.qtype)
                dtype = {gguf.GGMLQuantizationType.F32: np.float32,
                         gguf.GGMLQuantizationType.F16: np.float16}.get(t.qtype, np.uint8)
                writer.add_tensor_info(t.name, shape, np.dtype(dtype), t.nbytes, t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(t.nbytes for t in tensors)
        with tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress,
                  leave=False) as bar:
            for t in tensors:
                data = t.source.data if isinstance(t, CopiedTensor) else t.produce()
                if data.nbytes != t.nbytes:
                    raise AssertionError(f"{t.name}: produced {data.nbytes} bytes, declared {t.nbytes}")
                writer.write_tensor_data(data)
                bar.update(t.nbytes)
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
