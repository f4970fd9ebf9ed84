"""Mutations of a small LoRC GGUF for the loader fuzz test (tests/test_fuzz_runtime.py).

A ``Mutant`` is a named recipe that writes one damaged copy of a base LoRC file: metadata changed
(``lorc.version``, the rank arrays, the hybrid defaults), factor tensors reshaped, dropped,
renamed, retyped or duplicated, the file truncated, or bytes of the tensor data flipped. Structural
mutants are written with gguf-py's ``GGUFWriter`` from an editable copy of the base (``Model``);
truncations and byte flips edit the base file's bytes. Everything is derived from a seed, so the
same base and seed give the same mutants.

``expect`` is what a correct loader must do with the mutant: ``"load_error"`` (refuse it with a
message), ``"loaded"`` (load it and decode), or ``None`` when both are acceptable (e.g. a factor
stored as I32: refusing is right, so is computing something). A crash is never acceptable.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lorc_gguf.format import keys as constants
from lorc_gguf.format.read import FastGGUFReader
from lorc_gguf.format.write import MetadataItem, copy_metadata

QT = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType

LOADED, LOAD_ERROR = "loaded", "load_error"
U32_MAX = 2**32 - 1


# --- an editable GGUF ------------------------------------------------------------------------

@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 = row length first)
    qtype: Any  # a GGMLQuantizationType, or a bare int for type ids gguf-py does not know
    data: np.ndarray  # raw bytes (uint8, 1-D)


@dataclass
class Model:
    arch: str
    metadata: list[MetadataItem]
    tensors: list[Tensor]
    alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT
    dense: Model | None = None  # the model the LoRC file was converted from (for its attn_k/attn_v)

    # metadata
    def get(self, key: str) -> MetadataItem | None:
        return next((m for m in self.metadata if m.key == key), None)

    def set(self, key: str, value: Any, vtype: VT, sub_type: VT | None = None) -> None:
        item = MetadataItem(key, value, vtype, sub_type)
        for i, m in enumerate(self.metadata):
            if m.key == key:
                self.metadata[i] = item
                return
        self.metadata.append(item)

    def drop_key(self, key: str) -> None:
        self.metadata = [m for m in self.metadata if m.key != key]

    # tensors
    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)

    def has(self, name: str) -> bool:
        return any(t.name == name for t in self.tensors)

    def replace_tensor(self, name: str, new: Tensor) -> None:
        self.tensors = [new if t.name == name else t for t in self.tensors]

    def drop(self, *names: str) -> None:
        self.tensors = [t for t in self.tensors if t.name not in names]

    def rename(self, mapping: dict[str, str]) -> None:
        self.tensors = [replace(t, name=mapping.get(t.name, t.name)) for t in self.tensors]


def read_model(path: Path) -> Model:
    reader = FastGGUFReader(path, "r")
    arch = bytes(reader.fields[gguf.Keys.General.ARCHITECTURE].parts[-1]).decode()
    tensors = [Tensor(t.name, tuple(int(d) for d in t.shape), QT(t.tensor_type),
                      np.asarray(reader.data[t.data_offset:t.data_offset + t.n_bytes]).view(np.uint8))
               for t in reader.tensors]
    return Model(arch, copy_metadata(reader), tensors, reader.alignment)


class _CachingWriter(gguf.GGUFWriter):
    """GGUFWriter that packs each large metadata array (the 49k-entry tokenizer lists every mutant
    shares) once instead of once per mutant: 0.3 s of pure-Python packing saved per file."""

    _cache: dict[int, tuple[Any, Any, Any, bytes]] = {}

    def _pack_val(self, val: Any, vtype: VT, add_vtype: bool, sub_type: VT | None = None) -> bytes:
        if vtype != VT.ARRAY or not isinstance(val, list) or len(val) < 1024:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        hit = self._cache.get(id(val))
        if hit is None or hit[0] is not val or hit[1:3] != (add_vtype, sub_type):
            hit = (val, add_vtype, sub_type, super()._pack_val(val, vtype, add_vtype, sub_type))
            self._cache[id(val)] = hit
        return hit[3]


def write_model(model: Model, path: Path) -> None:
    writer = _CachingWriter(path, model.arch)
    try:
        writer.data_alignment = model.alignment
        for m in model.metadata:
            writer.add_key_value(m.key, m.value, m.vtype, sub_type=m.sub_type)
        for t in model.tensors:
            # a non-uint8 dtype with raw_dtype keeps the element shape exactly as given
            writer.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.data.nbytes, t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in model.tensors:
            writer.write_tensor_data(np.ascontiguousarray(t.data).view(np.uint8).reshape(-1))
    finally:
        writer.close()


def data_region(path: Path) -> tuple[int, int]:
    """[start, end) of the tensor data in a GGUF file."""
    return int(FastGGUFReader(path, "r").data_offset), int(Path(path).stat().st_size)


# --- tensor data helpers ---------------------------------------------------------------------

def values_of(t: Tensor) -> np.ndarray:
    """float32 values, numpy shape (ne1, ne0)."""
    ne0, ne1 = t.shape[0], int(np.prod(t.shape[1:]))
    if t.qtype == QT.F32:
        v = t.data.view(np.float32)
    elif t.qtype == QT.F16:
        v = t.data.view(np.float16)
    else:
        v = gguf.quants.dequantize(t.data.reshape(ne1, -1), t.qtype)
    return np.asarray(v, dtype=np.float32).reshape(ne1, ne0)


def encoded(values: np.ndarray, qtype: Any) -> np.ndarray:
    """Raw bytes of ``values`` (numpy (rows, row length)) stored as ``qtype``."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == QT.F32:
        out = values
    elif qtype == QT.F16:
        out = values.astype(np.float16)
    elif qtype == QT.F64:
        out = values.astype(np.float64)
    elif qtype == QT.I8:
        out = np.clip(np.round(values * 64), -128, 127).astype(np.int8)
    elif qtype == QT.I16:
        out = np.round(values * 4096).astype(np.int16)
    elif qtype == QT.I32:
        out = np.round(values * 2**20).astype(np.int32)
    else:
        out = gguf.quants.quantize(values, qtype)
    return np.ascontiguousarray(out).view(np.uint8).reshape(-1)


def retyped(t: Tensor, qtype: Any) -> Tensor:
    return Tensor(t.name, t.shape, qtype, encoded(values_of(t), qtype))


def random_f16(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> Tensor:
    a = (rng.standard_normal(int(np.prod(shape))) * 0.1).astype(np.float16)
    return Tensor(name, shape, QT.F16, a.view(np.uint8))


# --- mutants ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """What the mutant names and recipes depend on, known before any file exists."""

    arch: str
    n_layer: int
    n_embd: int
    width: int  # n_embd_k_gqa = n_embd_v_gqa
    key_ranks: tuple[int, ...]
    value_ranks: tuple[int, ...]
    hybrid: bool  # the file keeps attn_k/attn_v for the hybrid cache


def spec_of(path: Path) -> Spec:
    model = read_model(Path(path))
    arch = model.arch
    meta = {m.key: m.value for m in model.metadata}
    return Spec(arch=arch, n_layer=int(meta[f"{arch}.block_count"]), n_embd=int(meta[f"{arch}.embedding_length"]),
                width=int(meta[f"{arch}.attention.head_count_kv"]) * int(meta[f"{arch}.attention.key_length"]),
                key_ranks=tuple(int(x) for x in meta[constants.key_rank_key(arch)]),
                value_ranks=tuple(int(x) for x in meta[constants.value_rank_key(arch)]),
                hybrid=model.has(constants.TENSOR_K.format(bid=0)))


class Base:
    """The files a mutant is made from: the LoRC GGUF and the dense model it was converted from."""

    def __init__(self, path: Path, dense_source: Path) -> None:
        self.path, self.dense_source = Path(path), Path(dense_source)

    @functools.cached_property
    def model(self) -> Model:
        return read_model(self.path)

    @functools.cached_property
    def dense(self) -> Model:
        return read_model(self.dense_source)


@dataclass(frozen=True)
class Mutant:
    name: str  # unique, file-name safe
    kind: str  # the mutation family, for the summary
    description: str
    expect: str | None
    build: Callable[[Base, Path], None] = field(repr=False, compare=False)


def _k(bid: int) -> dict[str, str]:
    return {"down": constants.TENSOR_K_DOWN.format(bid=bid), "up": constants.TENSOR_K_UP.format(bid=bid),
            "dense": constants.TENSOR_K.format(bid=bid)}


def _v(bid: int) -> dict[str, str]:
    return {"down": constants.TENSOR_V_DOWN.format(bid=bid), "up": constants.TENSOR_V_UP.format(bid=bid),
            "dense": constants.TENSOR_V.format(bid=bid)}


SIDE_NAMES = {"k": _k, "v": _v}
FACTOR_SUFFIXES = tuple(t.split("}", 1)[1] for t in (constants.TENSOR_K_DOWN, constants.TENSOR_K_UP,
                                                     constants.TENSOR_V_DOWN, constants.TENSOR_V_UP))


def is_factor(name: str) -> bool:
    return name.endswith(FACTOR_SUFFIXES)


def generate(spec: Spec, seed: int = 0, tag: str = "") -> list[Mutant]:
    """Every mutant of a LoRC GGUF with this ``spec``; ``Mutant.build(base, out)`` writes one.
    Names and recipes depend only on ``spec``, ``seed`` and ``tag`` (truncation offsets and
    flipped bytes are drawn from the seed when the mutant is built, relative to the file)."""
    rng = np.random.default_rng(seed)
    arch, n_layer, n_embd, width, hybrid = spec.arch, spec.n_layer, spec.n_embd, spec.width, spec.hybrid
    key_ranks, value_ranks = list(spec.key_ranks), list(spec.value_ranks)
    key_rank_key, value_rank_key = constants.key_rank_key(arch), constants.value_rank_key(arch)
    rank_keys = {"k": (key_rank_key, key_ranks), "v": (value_rank_key, value_ranks)}
    out: list[Mutant] = []
    prefix = f"{tag}-" if tag else ""

    def edit(name: str, kind: str, description: str, expect: str | None, fn: Callable[[Model], Any]) -> None:
        def build(base: Base, path: Path) -> None:
            src = base.model
            m = Model(src.arch, list(src.metadata), list(src.tensors), src.alignment, dense=base.dense)
            fn(m)
            write_model(m, path)
        out.append(Mutant(prefix + name, kind, description, expect, build))

    def on_bytes(name: str, kind: str, description: str, expect: str | None,
                 fn: Callable[[Base, bytearray], bytes]) -> None:
        def build(base: Base, path: Path) -> None:
            path.write_bytes(fn(base, bytearray(base.path.read_bytes())))
        out.append(Mutant(prefix + name, kind, description, expect, build))

    # -- identity: the unmodified base through the same writer (the harness itself works)
    edit("identity", "identity", "rewritten unchanged", LOADED, lambda m: None)

    # -- lorc.version
    for label, value, vtype in (("0", 0, VT.UINT32), ("2", 2, VT.UINT32), ("huge", U32_MAX, VT.UINT32),
                                ("string", "1", VT.STRING), ("int32", 1, VT.INT32), ("uint64", 1, VT.UINT64),
                                ("float", 1.0, VT.FLOAT32), ("bool", True, VT.BOOL)):
        edit(f"version-{label}", "version", f"lorc.version = {value!r} ({vtype.name})", LOAD_ERROR,
             lambda m, value=value, vtype=vtype: m.set(constants.KEY_VERSION, value, vtype))
    edit("version-missing", "version", "lorc.version removed (rank arrays kept)", LOAD_ERROR,
         lambda m: m.drop_key(constants.KEY_VERSION))

    # -- rank arrays: presence, length, element type
    for side, (key, ranks) in rank_keys.items():
        edit(f"ranks-{side}-missing", "rank-array", f"{key} removed", LOAD_ERROR, lambda m, key=key: m.drop_key(key))
        for n in (1, n_layer + 1, 64):  # gguf-py refuses to write empty arrays
            vals = (ranks * 64)[:n]
            edit(f"ranks-{side}-len{n}", "rank-array", f"{key} has {n} entries", LOAD_ERROR,
                 lambda m, key=key, vals=vals: m.set(key, vals, VT.ARRAY, VT.UINT32))
        for label, vals, sub, expect in (("float", [float(r) for r in ranks], VT.FLOAT32, LOAD_ERROR),
                                         ("string", [str(r) for r in ranks], VT.STRING, LOAD_ERROR),
                                         ("uint64", ranks, VT.UINT64, LOAD_ERROR),
                                         ("uint16", ranks, VT.UINT16, LOAD_ERROR),
                                         ("uint8", [1] * n_layer, VT.UINT8, LOAD_ERROR),
                                         ("bool", [True] * n_layer, VT.BOOL, LOAD_ERROR),
                                         # same bits read as uint32: the loader accepts int32 arrays
                                         ("int32", ranks, VT.INT32, LOADED),
                                         ("int32-negative", [-1] * n_layer, VT.INT32, LOAD_ERROR)):
            edit(f"ranks-{side}-type-{label}", "rank-array", f"{key} elements are {sub.name}", expect,
                 lambda m, key=key, vals=vals, sub=sub: m.set(key, vals, VT.ARRAY, sub))
        edit(f"ranks-{side}-scalar", "rank-array", f"{key} is a scalar uint32", LOAD_ERROR,
             lambda m, key=key, ranks=ranks: m.set(key, ranks[0], VT.UINT32))

    # -- rank values: off by one, zero, huge, > width, = width (dense marker)
    for side, (key, ranks) in rank_keys.items():
        for layer in ((0,) if side == "k" else (n_layer - 1,)):  # the first K layer, the last V layer
            r = ranks[layer]
            # r == width would mark the layer dense: it then needs attn_k/attn_v and leaves the
            # factors unused, a load error either way
            for label, value in (("minus1", r - 1), ("plus1", r + 1), ("zero", 0), ("huge", U32_MAX),
                                 ("width", width), ("width+1", width + 1), ("2width", 2 * width),
                                 ("i32max", 2**31 - 1), ("i32min", 2**31)):
                vals = list(ranks)
                vals[layer] = value
                edit(f"rank-{side}{layer}-{label}", "rank-value", f"{key}[{layer}] = {value} (tensors have {r})",
                     LOAD_ERROR, lambda m, key=key, vals=vals: m.set(key, vals, VT.ARRAY, VT.UINT32))

    # -- consistent rank change (control: metadata and tensors agree on a smaller rank)
    def lower_rank(m: Model, side: str, layer: int, new_rank: int) -> None:
        key, ranks = rank_keys[side]
        names = SIDE_NAMES[side](layer)
        down, up = m.tensor(names["down"]), m.tensor(names["up"])
        dv, uv = values_of(down), values_of(up)  # (r, n_embd), (width, r)
        m.replace_tensor(names["down"], Tensor(down.name, (down.shape[0], new_rank), down.qtype,
                                               encoded(dv[:new_rank], down.qtype)))
        m.replace_tensor(names["up"], Tensor(up.name, (new_rank, up.shape[1]), up.qtype,
                                             encoded(uv[:, :new_rank], up.qtype)))
        vals = list(ranks)
        vals[layer] = new_rank
        m.set(key, vals, VT.ARRAY, VT.UINT32)

    for side in ("k", "v"):
        for new_rank in (1, 32, 63):
            edit(f"consistent-rank-{side}0-{new_rank}", "consistent-rank",
                 f"layer 0 {side} rank {new_rank} in metadata and tensors", LOADED,
                 lambda m, side=side, new_rank=new_rank: lower_rank(m, side, 0, new_rank))

    # -- runtime defaults (lorc.sink_tokens / lorc.recent_window / lorc.decode_top_k)
    for key in (constants.KEY_SINK_TOKENS, constants.KEY_RECENT_WINDOW, constants.KEY_DECODE_TOP_K):
        short = key.split(".")[1]
        for label, value, vtype, expect in (("huge", U32_MAX, VT.UINT32, None), ("i32max", 2**31 - 1, VT.UINT32, None),
                                            ("i32min", 2**31, VT.UINT32, None), ("n_ctx", 64, VT.UINT32, LOADED),
                                            ("n_ctx+1", 65, VT.UINT32, LOADED), ("1000", 1000, VT.UINT32, LOADED),
                                            ("zero", 0, VT.UINT32, LOADED),
                                            ("string", "4", VT.STRING, LOAD_ERROR),
                                            ("float", 4.0, VT.FLOAT32, LOAD_ERROR),
                                            ("int32", 4, VT.INT32, LOAD_ERROR),
                                            ("array", [4, 4], VT.ARRAY, LOAD_ERROR)):
            sub = VT.UINT32 if vtype == VT.ARRAY else None
            edit(f"{short}-{label}", "hybrid-defaults", f"{key} = {value!r} ({vtype.name})", expect,
                 lambda m, key=key, value=value, vtype=vtype, sub=sub: m.set(key, value, vtype, sub))
    edit("sink-and-window-huge", "hybrid-defaults", "sink_tokens = window = 2^32-1", None,
         lambda m: (m.set(constants.KEY_SINK_TOKENS, U32_MAX, VT.UINT32),
                    m.set(constants.KEY_RECENT_WINDOW, U32_MAX, VT.UINT32)))
    edit("sink-and-window-wrap", "hybrid-defaults", "sink_tokens + window = 2^32 (wraps to 0)", None,
         lambda m: (m.set(constants.KEY_SINK_TOKENS, 2**31, VT.UINT32),
                    m.set(constants.KEY_RECENT_WINDOW, 2**31, VT.UINT32)))

    # -- tensor shapes
    for side in ("k", "v"):
        for layer in ((0,) if side == "k" else (n_layer - 1,)):
            names = SIDE_NAMES[side](layer)
            r = rank_keys[side][1][layer]
            for which, shape in (("down-rank+1", (n_embd, r + 1)), ("down-rank-1", (n_embd, r - 1)),
                                 ("up-rank+1", (r + 1, width)), ("up-rank-1", (r - 1, width)),
                                 ("down-embd-1", (n_embd - 1, r)), ("up-width+32", (r, width + 32))):
                tname = names[which.split("-")[0]]
                edit(f"shape-{side}{layer}-{which}", "shape", f"{tname} ggml shape {list(shape)}", LOAD_ERROR,
                     lambda m, tname=tname, shape=shape, s=int(rng.integers(2**31)):
                     m.replace_tensor(tname, random_f16(np.random.default_rng(s), tname, shape)))
            for which in ("down", "up"):
                tname = names[which]
                edit(f"shape-{side}{layer}-{which}-transposed", "shape", f"{tname} with ne0/ne1 swapped", LOAD_ERROR,
                     lambda m, tname=tname: m.replace_tensor(tname, replace(m.tensor(tname),
                                                                           shape=tuple(reversed(m.tensor(tname).shape)))))
            tname = names["down"]
            edit(f"shape-{side}{layer}-down-3d", "shape", f"{tname} as [n_embd, r, 1]", None,
                 lambda m, tname=tname: m.replace_tensor(tname, replace(m.tensor(tname), shape=m.tensor(tname).shape + (1,))))
            edit(f"shape-{side}{layer}-down-flat", "shape", f"{tname} as a 1-D tensor", LOAD_ERROR,
                 lambda m, tname=tname: m.replace_tensor(tname, replace(m.tensor(tname),
                                                                       shape=(int(np.prod(m.tensor(tname).shape)),))))

    # -- tensors dropped
    for side in ("k", "v"):
        for layer in range(n_layer):
            names = SIDE_NAMES[side](layer)
            for label, drop in (("down", [names["down"]]), ("up", [names["up"]]), ("both", [names["down"], names["up"]])):
                edit(f"drop-{side}{layer}-{label}", "dropped", f"removed {', '.join(drop)}", LOAD_ERROR,
                     lambda m, drop=drop: m.drop(*drop))
    edit("drop-all-factors", "dropped", "every factor removed", LOAD_ERROR,
         lambda m: m.drop(*[n for s in SIDE_NAMES.values() for il in range(n_layer) for k, n in s(il).items() if k != "dense"]))
    if hybrid:
        # rank = width marks the layer dense; with its factors gone, this is a consistent file
        def densify(m: Model) -> None:
            names = _k(0)
            m.drop(names["down"], names["up"])
            vals = list(key_ranks)
            vals[0] = width
            m.set(key_rank_key, vals, VT.ARRAY, VT.UINT32)
        edit("drop-k0-factors-rank-width", "dropped", "layer 0 K factors removed and its rank set to width", LOADED, densify)
    for side in ("k", "v"):
        dense = SIDE_NAMES[side](0)["dense"]
        if hybrid:
            edit(f"drop-{side}0-dense", "dropped", f"removed {dense} (hybrid falls back to the plain cache)", LOADED,
                 lambda m, dense=dense: m.drop(dense))

    # -- tensors swapped / renamed
    def swap(a: str, b: str) -> Callable[[Model], None]:
        return lambda m: m.rename({a: b, b: a})

    same_shape = key_ranks == value_ranks
    swaps = [("k0down-v0down", _k(0)["down"], _v(0)["down"], LOADED if same_shape else None),
             ("k0up-v0up", _k(0)["up"], _v(0)["up"], LOADED if same_shape else None),
             ("k0down-k1down", _k(0)["down"], _k(1)["down"], LOADED if key_ranks[0] == key_ranks[1] else None),
             ("k0down-k0up", _k(0)["down"], _k(0)["up"], LOAD_ERROR),
             ("v1down-v1up", _v(1)["down"], _v(1)["up"], LOAD_ERROR),
             ("k0down-q0", _k(0)["down"], "blk.0.attn_q.weight", LOAD_ERROR),
             ("v0up-output0", _v(0)["up"], "blk.0.attn_output.weight", LOAD_ERROR)]
    for label, a, b, expect in swaps:
        edit(f"swap-{label}", "swapped", f"names of {a} and {b} exchanged", expect, swap(a, b))
    edit("rename-k0down-typo", "swapped", "blk.0.attn_k_down.weight renamed blk.0.attn_kdown.weight", LOAD_ERROR,
         lambda m: m.rename({_k(0)["down"]: "blk.0.attn_kdown.weight"}))
    edit("rename-k0down-layer9", "swapped", "blk.0.attn_k_down.weight renamed blk.9.attn_k_down.weight", LOAD_ERROR,
         lambda m: m.rename({_k(0)["down"]: constants.TENSOR_K_DOWN.format(bid=9)}))

    # -- factor types
    float_types = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q5_1, QT.F64]
    odd_types = [QT.I8, QT.I16, QT.I32]
    for side, which in (("k", "down"), ("k", "up"), ("v", "down"), ("v", "up")):
        tname = SIDE_NAMES[side](0)[which]
        # every type for one down and one up factor, a few for the other two
        types = float_types + odd_types if (side, which) in (("k", "down"), ("v", "up")) else [QT.BF16, QT.Q4_0, QT.I32]
        for qt in types:
            # F64 is not a mul_mat weight type on CPU; integers are nonsense
            expect = LOADED if qt in (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q5_1) else None
            edit(f"type-{side}0{which}-{qt.name.lower()}", "factor-type", f"{tname} stored as {qt.name}", expect,
                 lambda m, tname=tname, qt=qt: m.replace_tensor(tname, retyped(m.tensor(tname), qt)))
    for qt in (QT.Q8_0, QT.Q4_0, QT.I32):
        edit(f"type-all-factors-{qt.name.lower()}", "factor-type", f"every factor stored as {qt.name}",
             LOADED if qt in (QT.Q8_0, QT.Q4_0) else None,
             lambda m, qt=qt: [m.replace_tensor(t.name, retyped(t, qt)) for t in list(m.tensors)
                               if is_factor(t.name)])
    tname = _k(0)["down"]
    # a K-quant needs rows of 256 values; the factor's rows are n_embd = 128 long
    edit("type-k0down-q4_k-short-rows", "factor-type", f"{tname} typed Q4_K with 128-value rows", LOAD_ERROR,
         lambda m: m.replace_tensor(tname, Tensor(tname, m.tensor(tname).shape, QT.Q4_K,
                                                  np.zeros(144 * m.tensor(tname).shape[1] // 2, np.uint8))))
    for type_id in (4, 5, 99):  # removed Q4_2/Q4_3 ids and an unknown one
        edit(f"type-k0down-id{type_id}", "factor-type", f"{tname} with ggml type id {type_id}", LOAD_ERROR,
             lambda m, type_id=type_id: m.replace_tensor(tname, replace(m.tensor(tname), qtype=type_id)))
    edit("type-k0down-byte-size-mismatch", "factor-type", f"{tname} typed F32 with F16 bytes", LOAD_ERROR,
         lambda m: m.replace_tensor(tname, replace(m.tensor(tname), qtype=QT.F32)))
    edit("type-k0down-f16-as-bf16", "factor-type", f"{tname} F16 bytes declared BF16 (same size)", LOADED,
         lambda m: m.replace_tensor(tname, replace(m.tensor(tname), qtype=QT.BF16)))

    # -- duplicated dense weights next to the factors
    if not hybrid:
        for side in ("k", "v"):
            for layer in range(n_layer):
                dense = SIDE_NAMES[side](layer)["dense"]
                edit(f"dup-dense-{side}{layer}", "duplicated-dense", f"{dense} added next to its factors", None,
                     lambda m, dense=dense: m.tensors.append(m.dense.tensor(dense)))
        all_dense = [SIDE_NAMES[s](il)["dense"] for s in ("k", "v") for il in range(n_layer)]
        edit("dup-dense-all", "duplicated-dense", "every attn_k/attn_v added next to the factors", None,
             lambda m: m.tensors.extend(m.dense.tensor(n) for n in all_dense))
        edit("dup-dense-all-hybrid-keys", "duplicated-dense",
             "every attn_k/attn_v added and hybrid defaults set (sinks 4, window 16)", LOADED,
             lambda m: (m.tensors.extend(m.dense.tensor(n) for n in all_dense),
                        m.set(constants.KEY_SINK_TOKENS, 4, VT.UINT32), m.set(constants.KEY_RECENT_WINDOW, 16, VT.UINT32)))
    else:
        for side in ("k", "v"):
            dense = SIDE_NAMES[side](0)["dense"]
            # n_embd == width here: the transposed shape is the same, only the values move
            edit(f"shape-{side}0-dense-transposed", "shape", f"{dense} (hybrid exact weight) transposed", None,
                 lambda m, dense=dense: m.replace_tensor(dense, replace(m.tensor(dense),
                                                                       shape=tuple(reversed(m.tensor(dense).shape)))))
            edit(f"shape-{side}0-dense-wide", "shape", f"{dense} (hybrid exact weight) one column wider", LOAD_ERROR,
                 lambda m, dense=dense: m.replace_tensor(dense, random_f16(np.random.default_rng(seed), dense,
                                                                          (n_embd + 1, width))))
            edit(f"type-{side}0-dense-i32", "factor-type", f"{dense} (hybrid exact weight) stored as I32", None,
                 lambda m, dense=dense: m.replace_tensor(dense, retyped(m.tensor(dense), QT.I32)))
            edit(f"type-{side}0-dense-q8_0", "factor-type", f"{dense} (hybrid exact weight) stored as Q8_0", LOADED,
                 lambda m, dense=dense: m.replace_tensor(dense, retyped(m.tensor(dense), QT.Q8_0)))

    # -- truncations (bytes): fixed places around the header/data boundary and random offsets
    fixed_cuts = [lambda size, start: 0, lambda size, start: 3, lambda size, start: 4, lambda size, start: 8,
                  lambda size, start: 16, lambda size, start: 24, lambda size, start: start - 1,
                  lambda size, start: start, lambda size, start: start + 1, lambda size, start: size - 32,
                  lambda size, start: size - 1]
    random_cuts = [(lambda size, start, i=i: int(np.random.default_rng([seed, 1, i]).integers(25, start - 1)))
                   for i in range(3)]
    random_cuts += [(lambda size, start, i=i: int(np.random.default_rng([seed, 2, i]).integers(start + 2, size - 32)))
                    for i in range(3)]
    for i, cut_at in enumerate(fixed_cuts + random_cuts):
        def cut(base: Base, b: bytearray, cut_at=cut_at) -> bytes:
            return bytes(b[:cut_at(len(b), data_region(base.path)[0])])
        on_bytes(f"truncate-{i:02d}", "truncated", "file cut short" + (" at a random offset" if i >= len(fixed_cuts)
                                                                      else ""), LOAD_ERROR, cut)

    # -- random byte flips in the tensor data region (bytes): must still load
    for i in range(8):
        n_flips = [1, 8, 64, 1024][i % 4]
        where = "factor data" if i % 2 else "tensor data"

        def flip(base: Base, b: bytearray, i=i, n_flips=n_flips) -> bytes:
            r = np.random.default_rng([seed, 3, i])
            if i % 2 == 0:  # anywhere in the data
                positions = r.integers(data_region(base.path)[0], len(b), n_flips)
            else:  # inside the factors
                reader = FastGGUFReader(base.path, "r")
                spans = [(int(t.data_offset), int(t.data_offset + t.n_bytes)) for t in reader.tensors
                         if is_factor(t.name)]
                positions = [r.integers(*spans[j]) for j in r.integers(0, len(spans), n_flips)]
            for p, mask in zip(positions, r.integers(1, 256, n_flips)):
                b[int(p)] ^= int(mask)
            return bytes(b)

        on_bytes(f"flip-{i:02d}-{n_flips}", "byte-flip", f"{n_flips} random bytes flipped in the {where}", LOADED, flip)

    names = [m.name for m in out]
    assert len(names) == len(set(names)), "mutant names must be unique"
    return out



# --- loading mutants in child processes ------------------------------------------------------

CRASH, HANG = "crash", "hang"
MARKER = "@@fuzz-load "
PROBE_TOKENS = [1, 100, 1000, 10000]


def _child_main(paths: Sequence[str]) -> int:
    """Load each file with llama.cpp, decode PROBE_TOKENS when it loads, print one JSON line per
    file (flushed). llama.cpp's error log lines are collected into the record; stderr gets a
    marker before each file so the parent can cut a crash's stderr tail per file."""
    import ctypes

    import llama_cpp

    from lorc_gguf.runtime.session import Session, SessionParams

    log: list[str] = []

    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            log.append(text.decode(errors="replace"))

    callback = llama_cpp.llama_log_callback(on_log)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    params = SessionParams(n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1)
    for path in paths:
        sys.stderr.write(f"{MARKER}{path}\n")
        sys.stderr.flush()
        log.clear()
        record: dict[str, Any] = {"file": path}
        try:
            session = Session(path, params)
        except RuntimeError as e:
            record.update(outcome=LOAD_ERROR, stage="context" if "context" in str(e) else "model")
        else:
            sys.stderr.write("loaded; decoding\n")
            sys.stderr.flush()
            try:
                logits = session.decode_seq(PROBE_TOKENS)
                record.update(outcome=LOADED, finite=bool(np.isfinite(logits).all()))
            except RuntimeError as e:
                record.update(outcome="decode_error", error=str(e))
            finally:
                session.close()
        record["log"] = "".join(log).strip()[-600:]
        print(json.dumps(record), flush=True)
    return 0


def load_in_children(paths: Sequence[Path], timeout_per_file: float = 120.0) -> dict[str, dict[str, Any]]:
    """Outcome of every path: the child's record, or ``crash``/``hang`` with the exit status and
    the stderr tail when a child died (or stalled) on it; a new child takes the files after it."""
    remaining = [str(p) for p in paths]
    results: dict[str, dict[str, Any]] = {}
    repo_root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")]))
    while remaining:
        with tempfile.TemporaryFile("w+", errors="replace") as err:
            proc = subprocess.Popen([sys.executable, __file__, "--load", *remaining], stdout=subprocess.PIPE,
                                    stderr=err, text=True, env=env)
            lines: queue.Queue[str | None] = queue.Queue()

            def pump() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.put(line)
                lines.put(None)

            threading.Thread(target=pump, daemon=True).start()
            hung = False
            while True:
                try:
                    line = lines.get(timeout=timeout_per_file)
                except queue.Empty:
                    proc.kill()
                    hung = True
                    break
                if line is None:
                    break
                if line.startswith("{"):
                    record = json.loads(line)
                    results[record["file"]] = record
            returncode = proc.wait()
            remaining = [p for p in remaining if p not in results]
            if not remaining:
                break
            err.seek(0)
            tail = err.read().rsplit(MARKER, 1)[-1]
            culprit = remaining.pop(0)
            results[culprit] = {"file": culprit, "outcome": HANG if hung else CRASH, "returncode": returncode,
                                "stderr_tail": "\n".join(tail.splitlines()[1:])[-3000:]}
    return results


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--load":
        sys.exit(_child_main(sys.argv[2:]))
    sys.exit("usage: fuzz_gguf.py --load FILE...")
