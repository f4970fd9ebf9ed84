"""Dense-equivalent of a LoRC GGUF: every factor pair multiplied back into an ordinary
``attn_k``/``attn_v`` weight (W = up * down), LoRC metadata removed (a hybrid-cache file's exact
``attn_k``/``attn_v`` are replaced too: the result is the latent approximation everywhere).

The result runs on any llama.cpp through the ordinary attention path and computes the same
function as the latent cache up to rounding, so comparing the two isolates the runtime's latent
path from the approximation itself (tests, ``tools/eval.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from ..errors import LorcError
from ..format import keys
from ..format.read import FastGGUFReader
from ..format.write import CopiedTensor, NewTensor, copy_metadata, write_gguf
from .factorize import decode

QT = gguf.GGMLQuantizationType
_OUTTYPES = {"f32": QT.F32, "f16": QT.F16}


def _factor(tensor) -> np.ndarray:
    rows, cols = int(tensor.shape[1]), int(tensor.shape[0])  # ggml [cols, rows] -> numpy (rows, cols)
    return decode(tensor.data, QT(tensor.tensor_type)).reshape(rows, cols)


def write_dense_equivalent(src: str | os.PathLike[str], dst: str | os.PathLike[str], outtype: str = "f32") -> Path:
    src, dst = Path(src), Path(dst)
    if outtype not in _OUTTYPES:
        raise LorcError(f"dense-equivalent outtype must be one of {sorted(_OUTTYPES)}")
    qtype = _OUTTYPES[outtype]
    reader = FastGGUFReader(src, "r")
    arch_field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None or keys.KEY_VERSION not in reader.fields:
        raise LorcError(f"{src} is not a LoRC GGUF (no {keys.KEY_VERSION})")
    arch = bytes(arch_field.parts[-1]).decode()
    skip = [k for k in reader.fields if k.startswith("lorc.")]
    skip += [keys.key_rank_key(arch), keys.value_rank_key(arch)]
    metadata = copy_metadata(reader, skip=skip)
    by_name = {t.name: t for t in reader.tensors}

    # a hybrid-cache file also keeps the exact attn_k/attn_v of factorized layers: the
    # dense-equivalent replaces them with up * down
    replaced = {dense.format(bid=int(t.name.split(".")[1]))
                for t in reader.tensors
                for down, dense in ((keys.TENSOR_K_DOWN, keys.TENSOR_K),
                                    (keys.TENSOR_V_DOWN, keys.TENSOR_V))
                if t.name.endswith(down.split("}", 1)[1])}

    tensors = []
    for t in reader.tensors:
        if t.name in replaced:
            continue
        for down_tpl, up_tpl, dense_tpl in ((keys.TENSOR_K_DOWN, keys.TENSOR_K_UP, keys.TENSOR_K),
                                            (keys.TENSOR_V_DOWN, keys.TENSOR_V_UP, keys.TENSOR_V)):
            suffix_down = down_tpl.split("}", 1)[1]
            suffix_up = up_tpl.split("}", 1)[1]
            if t.name.endswith(suffix_up):
                break  # written together with its down factor
            if t.name.endswith(suffix_down):
                bid = int(t.name.split(".")[1])
                down, up = t, by_name[up_tpl.format(bid=bid)]
                rows = int(up.shape[1])
                cols = int(down.shape[0])

                def produce(down=down, up=up) -> np.ndarray:
                    w = _factor(up) @ _factor(down)
                    return w.astype(np.float32 if qtype == QT.F32 else np.float16)

                tensors.append(NewTensor(dense_tpl.format(bid=bid), (rows, cols), qtype, produce))
                break
        else:
            tensors.append(CopiedTensor(t))
    write_gguf(dst, arch, metadata, tensors, progress=False)
    return dst
