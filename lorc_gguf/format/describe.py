"""Read back any GGUF's LoRC layout: ranks per layer and KV-cache bytes per token (``tools/report.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from ..arch import SIDES, Side, for_name
from ..errors import LorcError
from . import keys
from .info import read_lorc
from .keys import F16_BYTES, report_path
from .read import FastGGUFReader, ReaderMetadata, is_gguf_file


def describe(path: str | Path) -> dict[str, Any]:
    """Ranks, widths and f16-cache bytes/token of a GGUF (dense models report full widths).

    The kappa profile is not stored in the GGUF; it is taken from ``PATH.lorc.json`` when that
    report sits beside the file.
    """
    path = Path(path)
    if not path.is_file():
        raise LorcError(f"GGUF not found: {path}")
    if not is_gguf_file(path):
        raise LorcError(f"{path} is not a GGUF file")
    reader = FastGGUFReader(path, "r")
    meta = ReaderMetadata(reader)
    architecture = for_name(meta.get(gguf.Keys.General.ARCHITECTURE) or "")
    shape = architecture.shape(meta)
    widths = {side: list(shape.widths(side)) for side in SIDES}
    lorc = read_lorc(meta, shape.architecture)
    is_lorc = lorc["lorc_version"] > 0
    ranks = dict(widths)
    if is_lorc:
        for side, key in ((Side.KEY, keys.key_rank_key(shape.architecture)),
                          (Side.VALUE, keys.value_rank_key(shape.architecture))):
            stored = lorc[f"{side.value}_rank"]
            if stored is None or len(stored) != shape.n_layer:
                raise LorcError(f"{path}: LoRC file without a valid {key}")
            ranks[side] = stored
    dense = sum(widths[Side.KEY]) + sum(widths[Side.VALUE])
    kept = sum(ranks[Side.KEY]) + sum(ranks[Side.VALUE])
    info: dict[str, Any] = {
        "path": str(path),
        "architecture": shape.architecture,
        "n_layer": shape.n_layer,
        "n_embd": shape.n_embd,
        "lorc": is_lorc,
        "lorc_version": lorc["lorc_version"] or None,
        "allocation": lorc["allocation"],
        "method": lorc["method"],
        "key_rank": ranks[Side.KEY],
        "value_rank": ranks[Side.VALUE],
        "key_width": widths[Side.KEY],
        "value_width": widths[Side.VALUE],
        "kv_width_dense": dense,
        "kv_width_kept": kept,
        "kv_width_fraction": kept / dense,
        "bytes_per_token_f16_dense": dense * F16_BYTES,
        "bytes_per_token_f16": kept * F16_BYTES,
        # runtime defaults the file carries (the runtime's lorc_* context parameters override them)
        "sink_tokens": lorc["sink_tokens"],
        "recent_window": lorc["recent_window"],
        "decode_top_k": lorc["decode_top_k"],
        "kappa": None,
    }
    sidecar = report_path(path)
    if sidecar.is_file():
        try:
            info["kappa"] = json.loads(sidecar.read_text()).get("kappa")
        except (OSError, json.JSONDecodeError):
            info["kappa"] = None
    return info


def format_description(info: dict[str, Any]) -> str:
    kind = (f"LoRC v{info['lorc_version']} ({info['allocation']}, {info['method']})" if info["lorc"]
            else "dense (not LoRC-converted)")
    lines = [f"{info['path']}: {info['architecture']}, {info['n_layer']} layers, {kind}"]
    kappa = info.get("kappa") or {}
    header = f"{'layer':>5} {'rank_k':>9} {'rank_v':>9}"
    if kappa:
        header += f" {'kappa_k':>8} {'kappa_v':>8}"
    lines.append(header)
    for il in range(info["n_layer"]):
        row = (f"{il:>5} {_cell(info['key_rank'][il], info['key_width'][il]):>9} "
               f"{_cell(info['value_rank'][il], info['value_width'][il]):>9}")
        if kappa:
            row += f" {kappa['key'][il]:>8.1f} {kappa['value'][il]:>8.1f}"
        lines.append(row)
    lines.append(f"KV width {info['kv_width_kept']}/{info['kv_width_dense']} = {info['kv_width_fraction']:.3f}; "
                 f"f16 cache {info['bytes_per_token_f16']} bytes/token "
                 f"(dense {info['bytes_per_token_f16_dense']})")
    if info["lorc"]:
        hybrid = (f"exact window, {info['sink_tokens']} sink tokens + {info['recent_window']} recent exact"
                  if info["sink_tokens"] or info["recent_window"] else "plain latent cache")
        top_k = (f"decoding rebuilds the {info['decode_top_k']} best latent keys and attends the other latent "
                 "cells at their scores" if info["decode_top_k"]
                 else "decoding rebuilds every latent key")
        lines.append(f"runtime defaults: {hybrid}; {top_k} (lorc_* context parameters override)")
    if not kappa and info["lorc"]:
        lines.append(f"(no kappa profile: {report_path(Path(info['path'])).name} not found beside the file)")
    return "\n".join(lines)


def _cell(rank: int, width: int) -> str:
    return f"{rank}/{width}" if rank < width else f"{width} (d)"
