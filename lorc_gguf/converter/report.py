"""Stage 6: the JSON report written beside the output, and the summary printed after a conversion.

The kappa profile lives only here (the GGUF carries ranks, not analysis). The top-level
``key_rank`` / ``value_rank`` lists make a report usable as ``--ranks REPORT.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..arch import SIDES, ModelShape, Side
from ..format import keys
from ..format.keys import F16_BYTES
from ..format.write import temp_path_beside
from .allocate import Allocation, cumulative_log_condition, normalized_profile
from .spectra import Spectra, energy_kept, truncation_error

def _short(side: Side) -> str:
    return "k" if side is Side.KEY else "v"


@dataclass(frozen=True)
class RunInfo:
    """What was asked for and what happened, beyond the analysis arrays."""

    source: str
    source_format: str  # "gguf" or "hf"
    output: str
    outtype: str
    ratio: float | None
    key_ratio: float | None
    value_ratio: float | None
    rank_multiple: int
    notices: tuple[str, ...]
    elapsed_s: float
    bytes_in: int
    bytes_out: int


def build_report(shape: ModelShape, spectra: Spectra, allocation: Allocation,
                 errors: dict[tuple[Side, int], float], info: RunInfo) -> dict[str, Any]:
    """``errors``: measured relative Frobenius error of the stored factors per factorized matrix."""
    cumulative = {side: cumulative_log_condition(spectra.condition(side)) for side in SIDES}
    profile = {side: normalized_profile(spectra.condition(side)) for side in SIDES}
    layers = []
    for il in range(shape.n_layer):
        row: dict[str, Any] = {"layer": il}
        for side in SIDES:
            s, r = spectra.values(side)[il], allocation.rank(side, il)
            x = _short(side)
            row[f"width_{x}"] = allocation.width(side, il)
            row[f"rank_{x}"] = r
            row[f"kappa_{x}"] = spectra.condition(side)[il]
            row[f"cum_log_kappa_{x}"] = float(cumulative[side][il])
            row[f"profile_{x}"] = float(profile[side][il])
            row[f"energy_{x}"] = energy_kept(s, r)
            row[f"svd_error_{x}"] = truncation_error(s, r)
            row[f"rel_error_{x}"] = errors.get((side, il), 0.0)
        layers.append(row)
    dense, kept = allocation.total_width, allocation.kept_width
    return {
        "lorc_version": keys.LORC_FORMAT_VERSION,
        "source": info.source,
        "source_format": info.source_format,
        "output": info.output,
        "architecture": shape.architecture,
        "n_layer": shape.n_layer,
        "n_embd": shape.n_embd,
        "allocation": allocation.method,
        "method": "svd",
        "outtype": info.outtype,
        "ratio": info.ratio,
        "key_ratio": info.key_ratio,
        "value_ratio": info.value_ratio,
        "rank_multiple": info.rank_multiple,
        "key_rank": list(allocation.key_rank),
        "value_rank": list(allocation.value_rank),
        "totals": {
            "kv_width_dense": dense,
            "kv_width_kept": kept,
            "kv_width_fraction": kept / dense,
            "key_width_fraction": allocation.side_fraction(Side.KEY),
            "value_width_fraction": allocation.side_fraction(Side.VALUE),
            "factorized_matrices": sum(allocation.is_factorized(side, il) for side in SIDES
                                       for il in range(shape.n_layer)),
            "bytes_per_token_f16_before": dense * F16_BYTES,
            "bytes_per_token_f16_after": kept * F16_BYTES,
            "file_bytes_before": info.bytes_in,
            "file_bytes_after": info.bytes_out,
            "mean_rel_error_k": _mean([row["rel_error_k"] for row in layers]),
            "mean_rel_error_v": _mean([row["rel_error_v"] for row in layers]),
        },
        "kappa": {"key": list(spectra.key_condition), "value": list(spectra.value_condition)},
        "layers": layers,
        "notices": list(info.notices),
        "elapsed_s": round(info.elapsed_s, 3),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def write_report(report: dict[str, Any], path: Path) -> None:
    """JSON beside the GGUF, replaced atomically like the GGUF itself."""
    tmp = temp_path_beside(path)
    try:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def format_summary(report: dict[str, Any]) -> str:
    """Per-layer table and totals, as printed by ``tools/convert.py``."""
    lines = [f"{report['source']} -> {report['output']}",
             f"allocation {report['allocation']}, factors {report['outtype']}, "
             f"{report['architecture']} with {report['n_layer']} layers",
             f"{'layer':>5} {'kappa_k':>8} {'kappa_v':>8} {'rank_k':>9} {'rank_v':>9} "
             f"{'err_k':>6} {'err_v':>6} {'energy_k':>8} {'energy_v':>8}"]
    for row in report["layers"]:
        lines.append(f"{row['layer']:>5} {row['kappa_k']:>8.1f} {row['kappa_v']:>8.1f} "
                     f"{_rank_cell(row['rank_k'], row['width_k']):>9} {_rank_cell(row['rank_v'], row['width_v']):>9} "
                     f"{row['rel_error_k']:>6.3f} {row['rel_error_v']:>6.3f} "
                     f"{row['energy_k']:>8.3f} {row['energy_v']:>8.3f}")
    t = report["totals"]
    lines.append(f"KV width kept {t['kv_width_kept']}/{t['kv_width_dense']} = {t['kv_width_fraction']:.3f} "
                 f"(K {t['key_width_fraction']:.3f}, V {t['value_width_fraction']:.3f}); "
                 f"f16 cache {t['bytes_per_token_f16_before']} -> {t['bytes_per_token_f16_after']} bytes/token; "
                 f"{t['factorized_matrices']} matrices factorized")
    lines.append(f"file {t['file_bytes_before'] / 1e6:.1f} MB -> {t['file_bytes_after'] / 1e6:.1f} MB "
                 f"in {report['elapsed_s']:.1f} s")
    return "\n".join(lines)


def _rank_cell(rank: int, width: int) -> str:
    return f"{rank}/{width}" if rank < width else f"{width} (d)"
