"""The conversion pipeline: load -> spectra -> allocate -> factorize + write -> report.

``convert(src, dst, **options)`` is the library entry point behind ``tools/convert.py``. Memory
stays bounded by one layer: the spectra pass keeps singular values only, and the write pass
dequantizes and factorizes each K/V weight just before its factors are written (so each factorized
weight is decomposed twice: values only, then full; both are small next to reading the model).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from .. import corpus
from ..arch import SIDES, ModelShape, Side
from ..calibration import AUTO, BACKENDS, DEFAULT_CALIB_TOKENS, CalibrationStats
from ..errors import LorcError
from ..format import keys
from ..format.keys import report_path
from ..format.read import SourceModel, open_gguf
from ..format.write import CopiedTensor, MetadataItem, NewTensor, OutputTensor, copy_metadata, write_gguf
from . import allocate, aware
from .allocate import Allocation, RankGrid
from .factorize import OUTTYPES, check_encodable, decode, encode, relative_error, truncated_svd
from .hf import convert_folder, is_hf_folder
from .report import RunInfo, build_report, format_summary, write_report
from .spectra import Spectra, compute_spectra

VT = gguf.GGUFValueType
Log = Callable[[str], None]

# a kept fraction this far from the requested ratio is worth telling the user about
RATIO_NOTICE_TOLERANCE = 0.01

# BLAS threads for the SVDs. K/V weights are small matrices (<= a few thousand on a side), where a
# multi-threaded OpenBLAS gains little and, on a busy machine, loses a lot to spinning threads
# (SmolLM2 on 2 shared cores: 3 s with one thread, 40 s with two). One thread also makes the
# floating-point reduction order, hence the output bytes, independent of the machine's core count.
BLAS_THREADS = 1

ALLOCATIONS = allocate.METHODS + (aware.SENSITIVITY,)


@dataclass(frozen=True)
class ConvertOptions:
    """Every option of a conversion; the defaults are the best measured configuration (README,
    "Converting"): calibrated on the built-in text, progressive ranks, exact sinks and window."""

    allocation: str = allocate.PROGRESSIVE
    ratio: float = 0.5
    key_ratio: float | None = None
    value_ratio: float | None = None
    ranks: str | Path | dict | Sequence[int] | None = None  # implies allocation "explicit"
    rank_multiple: int = keys.RANK_MULTIPLE
    outtype: str = "f16"
    progress: bool = True
    # the LoRC paper's method: truncated SVD of the weights alone, no statistics, and (unless
    # sink_tokens / recent_window say otherwise) the plain latent cache
    data_free: bool = False
    # activation-aware factorization (aware.py); see validated() for how they combine
    method: str | None = None  # None: svd-whiten (svd-diag-act with an imatrix, svd when data-free)
    # text FILE, "builtin" (every calibration domain of corpus), domain names "docs,code", a .npz
    # statistics cache, or a CalibrationStats; None = "builtin" when the method needs statistics
    calibration: Any = None
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    calibration_backend: str = AUTO  # calibration.BACKENDS: who runs the model over the text
    # GiB of float64 accumulators the runtime backend may hold; larger statistics spill to a
    # temporary folder beside the output (None: calibration.statistics.STATS_MEMORY_BYTES)
    calibration_memory: float | None = None
    imatrix: str | Path | None = None  # llama.cpp importance matrix (GGUF or legacy .dat)
    ridge: float = aware.DEFAULT_RIDGE
    # weight of the calibration chunks' first-position inputs in the whitening (aware.input_factor);
    # None: aware.DEFAULT_SINK_WEIGHT when the file gets no exact sink cells, else 0
    sink_weight: float | None = None
    center: bool = False
    out_weight: bool = False
    value_weight: float = 1.0
    # exact sinks + recent window (runtime): exact K/V for the first sink_tokens and last
    # recent_window positions; > 0 keeps each factorized layer's dense attn_k/attn_v in the file.
    # None: keys.DEFAULT_SINK_TOKENS / DEFAULT_RECENT_WINDOW, 0 when data-free or where the
    # architecture cannot have them (sliding-window models)
    sink_tokens: int | None = None
    recent_window: int | None = None
    # selective reconstruction (runtime): a decoded token rebuilds only this many latent keys per
    # layer, those scoring best in latent space (0 = every key). None: keys.DEFAULT_DECODE_TOP_K (a
    # sliding-window model's: DEFAULT_DECODE_TOP_K_SWA) for a file with the exact window and latent
    # keys, else 0
    decode_top_k: int | None = None

    def validated(self) -> ConvertOptions:
        allocation = allocate.EXPLICIT if self.ranks is not None else self.allocation
        if allocation not in ALLOCATIONS:
            raise LorcError(f"unknown allocation '{allocation}' (choose from {', '.join(ALLOCATIONS)})")
        if allocation == allocate.EXPLICIT and self.ranks is None:
            raise LorcError("explicit allocation needs ranks (--ranks k0,v0,k1,v1,... or FILE.json)")
        allocate.check_ratio("ratio", self.ratio)
        for name, value in (("key ratio", self.key_ratio), ("value ratio", self.value_ratio)):
            if value is not None:
                allocate.check_ratio(name, value)
        if self.outtype not in OUTTYPES:
            raise LorcError(f"unknown outtype '{self.outtype}' (choose from {', '.join(OUTTYPES)})")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise LorcError(f"rank multiple must be a positive integer, got {self.rank_multiple!r}")
        block = gguf.GGML_QUANT_SIZES[OUTTYPES[self.outtype]][0]
        if allocation != allocate.EXPLICIT and self.rank_multiple % block != 0:
            raise LorcError(f"{self.outtype} factors need ranks in multiples of {block}; "
                            f"--rank-multiple {self.rank_multiple} is not one")
        for name, value in (("sink tokens", self.sink_tokens), ("recent window", self.recent_window),
                            ("decode top-k", self.decode_top_k)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
                raise LorcError(f"{name} must be an integer in [0, 1000000], got {value!r}")
        method = self.method
        if method is not None and method not in aware.METHODS:
            raise LorcError(f"unknown method '{method}' (choose from {', '.join(aware.METHODS)})")
        if self.data_free:
            if method not in (None, aware.SVD):
                raise LorcError(f"--data-free is the paper's method ({aware.SVD}): drop --method {method}")
            if self.calibration is not None or self.imatrix is not None:
                raise LorcError("--data-free uses no statistics: drop --calibration/--imatrix")
            method = aware.SVD
        if self.imatrix is not None and self.calibration is not None:
            raise LorcError("give either --calibration or --imatrix, not both")
        if method == aware.WHITEN and self.imatrix is not None:
            raise LorcError("an importance matrix holds per-channel mean squares only: use method "
                            f"{aware.DIAG} with --imatrix, or --calibration for {aware.WHITEN}")
        if method is None:
            method = aware.DIAG if self.imatrix is not None else aware.WHITEN
        if method == aware.SVD and (self.calibration is not None or self.imatrix is not None):
            raise LorcError("method svd is data-free; drop --calibration/--imatrix or choose an activation-aware method")
        if isinstance(self.calib_tokens, bool) or not isinstance(self.calib_tokens, int) or self.calib_tokens < 1:
            raise LorcError(f"calibration tokens must be a positive integer, got {self.calib_tokens!r}")
        if self.calibration_memory is not None and not self.calibration_memory >= 0:
            raise LorcError(f"calibration memory must be >= 0 GiB, got {self.calibration_memory!r}")
        if not (math.isfinite(self.ridge) and self.ridge >= 0.0):
            raise LorcError(f"ridge must be >= 0, got {self.ridge}")
        if self.sink_weight is not None and not (math.isfinite(self.sink_weight) and self.sink_weight >= 0.0):
            raise LorcError(f"sink weight must be >= 0, got {self.sink_weight}")
        if self.calibration_backend not in BACKENDS:
            raise LorcError(f"unknown calibration backend '{self.calibration_backend}' "
                            f"(choose from {', '.join(BACKENDS)})")
        if self.out_weight and self.calibration_backend == "runtime":
            raise LorcError("--out-weight needs the query statistics only the numpy forward records: "
                            "add --calibration-backend numpy")
        calibration = self.calibration
        if calibration is None and method != aware.SVD and self.imatrix is None:
            calibration = "builtin"
        if self.center and self.exact_cells_requested:
            # the mean correction changes attn_k/v.bias, which the exact sink/window path also adds
            raise LorcError("--center cannot be combined with the exact sinks / window (--sink-tokens, "
                            "--recent-window): give both as 0")
        return replace(self, allocation=allocation, ratio=float(self.ratio), method=method, calibration=calibration,
                       ridge=float(self.ridge), center=bool(self.center), out_weight=bool(self.out_weight),
                       value_weight=float(self.value_weight))

    @property
    def exact_cells_requested(self) -> bool:
        return bool(self.sink_tokens) or bool(self.recent_window)

    def for_model(self, shape: ModelShape, notice: Log) -> ConvertOptions:
        """The exact sink/window sizes resolved for a model: missing ones take the defaults
        (sliding-window models alike, with a window at least their own: the runtime keeps the exact
        cells of their global layers beside the store of their sliding-window layers)."""
        if self.data_free:
            sink, window = 0, 0
        elif self.center:
            sink, window = 0, 0  # validated(): the mean correction excludes exact cells
        else:
            # with sliding windows, at least the model's own window: Gemma-3-270M at ctx 2048, news /
            # drama, W = 384 +2.1% / +1.0%, its window 512 +1.6% / +0.9% (README)
            sink, window = keys.DEFAULT_SINK_TOKENS, max(keys.DEFAULT_RECENT_WINDOW, shape.sliding_window)
        return replace(self, sink_tokens=sink if self.sink_tokens is None else self.sink_tokens,
                       recent_window=window if self.recent_window is None else self.recent_window)._with_sink_weight()

    def top_k_for(self, shape: ModelShape, allocation: Allocation) -> int:
        """lorc.decode_top_k: as given, else the default where the file has the exact window and
        latent keys (measured there only: the plain latent cache rebuilds every key)."""
        if self.decode_top_k is not None:
            return self.decode_top_k
        if not (self.exact_cells_requested and allocation.has_latent_keys):
            return 0
        return keys.DEFAULT_DECODE_TOP_K_SWA if shape.sliding_window else keys.DEFAULT_DECODE_TOP_K

    def _with_sink_weight(self) -> ConvertOptions:
        """The sink weight resolved once the exact cells are: the factorization carries the sinks
        (whitened methods only) where no exact sink cells will."""
        if self.sink_weight is not None:
            return self
        carry = self.method == aware.WHITEN and not self.sink_tokens
        return replace(self, sink_weight=aware.DEFAULT_SINK_WEIGHT if carry else 0.0)

    @property
    def aware(self) -> aware.AwareOptions:
        return aware.AwareOptions(method=self.method or aware.SVD, ridge=self.ridge, center=self.center,
                                  out_weight=self.out_weight, sink_weight=self.sink_weight or 0.0)


def _check_paths(src: Path, dst: Path) -> None:
    if not src.exists():
        raise LorcError(f"MODEL not found: {src}")
    if dst.is_dir():
        raise LorcError(f"OUT {dst} is a folder; give the output file name")
    if not dst.parent.is_dir():
        raise LorcError(f"the folder of OUT does not exist: {dst.parent}")
    if dst.exists() and os.path.samefile(src, dst) or src.resolve() == dst.resolve():
        raise LorcError(f"OUT is the same file as MODEL ({src}); choose another output name")
    if src.is_dir() and not is_hf_folder(src):
        raise LorcError(f"{src} is a folder but not a Hugging Face model (needs config.json and "
                        "*.safetensors); MODEL must be a GGUF file or such a folder")


def factorized_layers(shape: ModelShape) -> tuple[int, ...]:
    """The layers a rule allocates ranks to: with sliding windows, the global layers only. A
    sliding-window layer's cache is bounded by its window, and its latent rows cost far more quality
    than they save (Gemma-3-270M, README); its K/V stay dense unless ``--ranks`` says otherwise."""
    return shape.global_layers or tuple(range(shape.n_layer))


def _allocate(model: SourceModel, spectra: Spectra, options: ConvertOptions,
              weighting: _Weighting | None = None) -> Allocation:
    shape = model.shape
    kw, vw = shape.widths(Side.KEY), shape.widths(Side.VALUE)
    if options.allocation == allocate.EXPLICIT:
        key, value = allocate.parse_ranks(options.ranks, shape.n_layer)
        return allocate.explicit(key, value, kw, vw)
    # the rule runs on the layers it allocates (j = their index there); the others keep their width
    layers = factorized_layers(shape)
    sub = _allocate_rule(model, spectra, options, weighting, layers, allocate.on_layers(kw, layers),
                         allocate.on_layers(vw, layers))
    key, value = list(kw), list(vw)
    for j, il in enumerate(layers):
        key[il], value[il] = sub.key_rank[j], sub.value_rank[j]
    return Allocation(method=sub.method, key_rank=tuple(key), value_rank=tuple(value), key_width=kw, value_width=vw)


def _allocate_rule(model: SourceModel, spectra: Spectra, options: ConvertOptions, weighting: _Weighting | None,
                   layers: tuple[int, ...], kw: tuple[int, ...], vw: tuple[int, ...]) -> Allocation:
    grid = RankGrid(multiple=options.rank_multiple)
    budget = dict(ratio=options.ratio, key_ratio=options.key_ratio, value_ratio=options.value_ratio, grid=grid)
    if options.allocation == allocate.UNIFORM:
        return allocate.uniform(kw, vw, **budget)
    calibrated_progressive = options.allocation == allocate.PROGRESSIVE and weighting is not None and weighting.active
    if options.allocation == aware.SENSITIVITY or calibrated_progressive:
        assert weighting is not None
        index = {il: j for j, il in enumerate(layers)}
        curves, kappa = {}, {Side.KEY: [], Side.VALUE: []}
        for side, il, w in model.iter_weights():
            if il not in index:
                continue
            dec = weighting.decomposition(side, il, w)
            curves[(side, index[il])] = dec.relative_errors()
            kappa[side].append(dec.condition())
        layer_weight = aware.progressive_weights(kappa, aware.PROGRESSIVE_STRENGTH) if calibrated_progressive else None
        return aware.sensitivity(curves, kw, vw, value_weight=options.value_weight, layer_weight=layer_weight,
                                 method=options.allocation, **budget)
    return allocate.progressive(allocate.on_layers(spectra.key_condition, layers),
                                allocate.on_layers(spectra.value_condition, layers), kw, vw, **budget)


class _Stages:
    """Wall time per stage of a conversion (the report's ``seconds``; a stage met twice adds up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._last, 3)
        self._last = now


def _ranks_need_statistics(options: ConvertOptions) -> bool:
    return options.allocation == aware.SENSITIVITY or (
        options.allocation == allocate.PROGRESSIVE and options.method != aware.SVD)


def _check_factor_shapes(model: SourceModel, allocation: Allocation, qtype: gguf.GGMLQuantizationType) -> None:
    for il in range(model.shape.n_layer):
        for side in SIDES:
            if allocation.is_factorized(side, il):
                rank, width = allocation.rank(side, il), allocation.width(side, il)
                down_name, up_name = model.architecture.factor_names(side, il)
                check_encodable((rank, model.shape.n_embd), qtype, down_name)
                check_encodable((width, rank), qtype, up_name)


def _ratio_notices(allocation: Allocation, options: ConvertOptions) -> list[str]:
    if allocation.method == allocate.EXPLICIT:
        return []
    checks: list[tuple[str, float, float]]
    if options.key_ratio is None and options.value_ratio is None:
        checks = [("KV", options.ratio, allocation.kept_fraction)]
    else:
        checks = [(side.value, getattr(options, f"{side.value}_ratio") or options.ratio,
                   allocation.side_fraction(side)) for side in SIDES]
    return [f"{what} width kept is {got:.3f}, not the requested {want:.3f}: ranks are limited to "
            f"[{RankGrid(options.rank_multiple).floor(min(allocation.key_width))}, width] in steps of "
            f"{options.rank_multiple}" for what, want, got in checks if abs(got - want) > RATIO_NOTICE_TOLERANCE]


def _top_k_notices(allocation: Allocation, options: ConvertOptions) -> list[str]:
    # written anyway: the file still says what it was made for, and the runtime ignores it alike
    if not options.decode_top_k:  # not given (the default is 0 without latent keys), or 0
        return []
    if not allocation.has_latent_keys:
        return ["--decode-top-k has no effect on this file: no layer's keys are latent"]
    return []


class _Weighting:
    """Calibration statistics and the activation-aware options: the transform of every weight."""

    def __init__(self, model: SourceModel, stats: CalibrationStats | None, opts: aware.AwareOptions) -> None:
        self.model, self.stats, self.opts = model, stats, opts
        self.output_errors: dict[tuple[Side, int], float] = {}
        # the last layer's input factor: its K and V (adjacent in every pass) read the same input,
        # so one Cholesky of its n_embd^2 second moment serves both (6 s at n_embd 8192)
        self._input: tuple[int, np.ndarray | None] | None = None

    @property
    def active(self) -> bool:
        return self.stats is not None and self.opts.method != aware.SVD

    def transform(self, side: Side, layer: int) -> aware.Transform:
        if not self.active:
            return aware.Transform()
        wo = None
        sh = self.model.shape
        if self.opts.out_weight and side is Side.VALUE:
            t = self.model.tensors[f"blk.{layer}.attn_output.weight"]
            wo = gguf.quants.dequantize(t.data, t.tensor_type).reshape(sh.n_embd, -1)
        stats = self.stats.layers[layer]
        if self._input is None or self._input[0] != layer:
            self._input = (layer, aware.layer_input_factor(stats, self.opts))
        return aware.make_transform(stats, side, self.opts, wo=wo, n_head=sh.n_head,
                                    n_head_kv=sh.n_head_kv[layer], head_dim=sh.head_dim_v, head_dim_k=sh.head_dim_k,
                                    rope_neox=sh.rope_neox, input_l=self._input[1])

    def decomposition(self, side: Side, layer: int, w: np.ndarray) -> aware.Decomposition:
        return aware.Decomposition.of(w, self.transform(side, layer))


class _FactorJob:
    """Factorizes one weight when its ``down`` tensor is written and hands ``up`` over next, so
    only one layer's factors are alive at a time. Records the stored factors' relative error."""

    def __init__(self, model: SourceModel, side: Side, layer: int, rank: int, qtype: gguf.GGMLQuantizationType,
                 errors: dict[tuple[Side, int], float], weighting: _Weighting | None = None) -> None:
        self.model, self.side, self.layer, self.rank, self.qtype, self.errors = model, side, layer, rank, qtype, errors
        self.weighting = weighting
        self._up: np.ndarray | None = None
        self._bias: np.ndarray | None = None

    def down(self) -> np.ndarray:
        w = self.model.weight(self.side, self.layer)
        wt = self.weighting
        if wt is not None and wt.active:
            dec = wt.decomposition(self.side, self.layer, w)
            factors = dec.factors(self.rank)
        else:
            dec, factors = None, truncated_svd(w, self.rank)
        down, up = encode(factors.down, self.qtype), encode(factors.up, self.qtype)
        up_d, down_d = decode(up, self.qtype), decode(down, self.qtype)
        stored = up_d @ down_d
        self.errors[(self.side, self.layer)] = relative_error(w, stored)
        if dec is not None:
            self._bias = dec.bias_delta(up_d, down_d)
            wt.output_errors[(self.side, self.layer)] = aware.output_error(
                w, stored, wt.stats.layers[self.layer], self._bias)
        self._up = up
        return down

    def up(self) -> np.ndarray:
        assert self._up is not None, "down() must be written before up()"
        up, self._up = self._up, None
        return up

    def bias(self, source: np.ndarray | None) -> np.ndarray:
        """The projection's bias: the source's (if any) plus the mean correction."""
        width = self.model.shape.width(self.side, self.layer)
        b = np.zeros(width) if source is None else np.asarray(source, dtype=np.float64).reshape(width)
        if self._bias is not None:
            b = b + self._bias
        return b.astype(np.float32).reshape(1, width)


def _bias_name(side: Side, layer: int) -> str:
    return (keys.TENSOR_K_BIAS if side is Side.KEY else keys.TENSOR_V_BIAS).format(bid=layer)


def _plan_tensors(model: SourceModel, allocation: Allocation, qtype: gguf.GGMLQuantizationType,
                  errors: dict[tuple[Side, int], float], weighting: _Weighting | None = None,
                  keep_dense: bool = False) -> list[OutputTensor]:
    """Input tensors in input order; each factorized weight becomes its down and up factors (and,
    with the mean correction, a bias written after them, replacing the source's bias if any)."""
    replaced: dict[str, tuple[Side, int]] = {}
    with_bias = weighting is not None and weighting.active and weighting.opts.center
    if with_bias and keep_dense:
        # the mean correction changes attn_k/v.bias, which the exact sink/window path also adds
        raise LorcError("--center cannot be combined with the hybrid cache (sink tokens / recent window)")
    biased: set[str] = set()
    for il in range(model.shape.n_layer):
        for side in SIDES:
            if allocation.is_factorized(side, il):
                replaced[model.architecture.weight_name(side, il)] = (side, il)
                if with_bias:
                    biased.add(_bias_name(side, il))
    plan: list[OutputTensor] = []
    n_embd = model.shape.n_embd
    for t in model.reader.tensors:
        if t.name in biased:
            continue  # rewritten after its layer's factors
        if t.name not in replaced:
            plan.append(CopiedTensor(t))
            continue
        if keep_dense:
            plan.append(CopiedTensor(t))  # the hybrid cache's exact K/V for sink and window cells
        side, il = replaced[t.name]
        rank, width = allocation.rank(side, il), allocation.width(side, il)
        down_name, up_name = model.architecture.factor_names(side, il)
        job = _FactorJob(model, side, il, rank, qtype, errors, weighting)
        plan.append(NewTensor(down_name, (rank, n_embd), qtype, job.down))
        plan.append(NewTensor(up_name, (width, rank), qtype, job.up))
        if with_bias:
            name = _bias_name(side, il)
            src = model.tensors.get(name)

            def produce(job=job, src=src) -> np.ndarray:
                return job.bias(None if src is None else gguf.quants.dequantize(src.data, src.tensor_type))
            plan.append(NewTensor(name, (1, width), gguf.GGMLQuantizationType.F32, produce))
    return plan


def _lorc_metadata(arch: str, allocation: Allocation, method: str = "svd", sink_tokens: int = 0,
                   recent_window: int = 0, decode_top_k: int = 0) -> list[MetadataItem]:
    return [
        MetadataItem(keys.KEY_VERSION, keys.LORC_FORMAT_VERSION, VT.UINT32),
        MetadataItem(keys.KEY_ALLOCATION, allocation.method, VT.STRING),
        MetadataItem(keys.KEY_METHOD, method, VT.STRING),
        MetadataItem(keys.KEY_SINK_TOKENS, sink_tokens, VT.UINT32),
        MetadataItem(keys.KEY_RECENT_WINDOW, recent_window, VT.UINT32),
        MetadataItem(keys.KEY_DECODE_TOP_K, decode_top_k, VT.UINT32),
        MetadataItem(keys.key_rank_key(arch), list(allocation.key_rank), VT.ARRAY, VT.UINT32),
        MetadataItem(keys.value_rank_key(arch), list(allocation.value_rank), VT.ARRAY, VT.UINT32),
    ]


def _statistics(model: SourceModel, opts: ConvertOptions, notice: Log, spill_dir: Path) -> CalibrationStats | None:
    """The input statistics the method needs: an imatrix, a stats cache, or a calibration run
    (statistics too large for memory are memory-mapped from a temporary folder in ``spill_dir``)."""
    from .. import calibration
    if opts.method == aware.SVD:
        return None
    memory = None if opts.calibration_memory is None else int(opts.calibration_memory * 2**30)
    if opts.imatrix is not None:
        from .imatrix import imatrix_stats
        return imatrix_stats(opts.imatrix, model.shape.n_layer)
    cal = opts.calibration
    if isinstance(cal, CalibrationStats):
        stats = cal
    elif str(cal).endswith(".npz"):
        stats = calibration.load_stats(cal, spill_dir=spill_dir, memory_bytes=memory)
    else:
        text, domains, what = _calibration_source(str(cal))
        with tqdm(desc="calibration", disable=not opts.progress, leave=False) as bar:
            def step(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)
            backend = calibration.resolve_backend(model, opts.calibration_backend, need_queries=opts.out_weight)
            stats = calibration.calibrate(model, text, n_tokens=opts.calib_tokens, full=opts.method == aware.WHITEN,
                                          progress=step, domains=domains, backend=backend, spill_dir=spill_dir,
                                          memory_bytes=memory)
        why = ""
        if opts.calibration_backend == AUTO and backend == "runtime":
            why = (f"; through the runtime: the numpy forward would hold "
                   f"{calibration.numpy_forward_bytes(model) / 1e9:.1f} GB of float32 weights")
        notice(f"calibrated on {stats.n_tokens} tokens of {what}{why}")
    if len(stats.layers) != model.shape.n_layer:
        raise LorcError(f"statistics cover {len(stats.layers)} layers, the model has {model.shape.n_layer}")
    if opts.out_weight and any(s.q_pair is None for s in stats.layers):
        raise LorcError("--out-weight needs query statistics, which these statistics lack (collected by the "
                        "runtime, or an imatrix): calibrate with --calibration-backend numpy")
    if opts.method == aware.WHITEN and not stats.has_full():
        raise LorcError(f"{aware.WHITEN} needs full second moments; these statistics hold the diagonal only")
    return stats


def _calibration_source(spec: str) -> tuple[str | None, tuple[str, ...] | None, str]:
    """(text, domains, description) of ``--calibration``: a text file, or "builtin" / domain names."""
    if not Path(spec).is_file():
        names = corpus.CALIBRATION_DOMAINS if spec == "builtin" else None
        items = [x.strip() for x in spec.split(",")]
        if names is None and all(x in corpus.DOMAINS for x in items):
            names = corpus.parse_domains(items, corpus.CALIBRATION)
        if names is not None:
            return None, tuple(names), f"the built-in text ({', '.join(names)}: equal shares)"
        raise LorcError(f"calibration text {spec} not found (a file, 'builtin', or domains from "
                        f"{', '.join(corpus.CALIBRATION_DOMAINS)})")
    try:
        return Path(spec).read_text(encoding="utf-8", errors="replace"), None, spec
    except OSError as e:
        raise LorcError(f"cannot read calibration text {spec}: {e.strerror}") from None


def _add_aware_report(report: dict[str, Any], opts: ConvertOptions, stats: CalibrationStats | None,
                      weighting: _Weighting) -> None:
    report["method"] = opts.method
    if stats is None:
        return
    report["calibration"] = {"source": "imatrix" if opts.imatrix is not None else stats.source,
                             "domains": stats.meta.get("domains"), "backend": stats.meta.get("backend"),
                             "imatrix": None if opts.imatrix is None else str(opts.imatrix),
                             "n_tokens": stats.n_tokens, "ridge": opts.ridge, "center": opts.center,
                             "out_weight": opts.out_weight, "sink_weight": opts.sink_weight,
                             "first_positions": min((0 if s.first is None else len(s.first)) for s in stats.layers)}
    for row in report["layers"]:
        for side, x in ((Side.KEY, "k"), (Side.VALUE, "v")):
            row[f"out_error_{x}"] = weighting.output_errors.get((side, row["layer"]), 0.0)
    out = [row[f"out_error_{x}"] for row in report["layers"] for x in "kv"]
    report["totals"]["mean_out_error"] = sum(out) / len(out) if out else 0.0


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, log: Log | None = None,
            **options: Any) -> dict[str, Any]:
    """Convert MODEL (GGUF file or HF safetensors folder) into a LoRC GGUF at ``dst``.

    Options are the fields of ``ConvertOptions``. Writes ``dst`` and ``dst + '.lorc.json'`` and
    returns the report dict. ``log`` receives notices as they happen (the report keeps them too).
    Raises ``LorcError`` for anything wrong with the input or the options, before writing.
    """
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        return _convert(src, dst, log, options)


def _convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], log: Log | None,
             options: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        opts = ConvertOptions(**options).validated()
    except TypeError as e:
        raise LorcError(str(e)) from None
    src_path, dst_path = Path(src), Path(dst)
    _check_paths(src_path, dst_path)
    notices: list[str] = []

    def notice(msg: str) -> None:
        notices.append(msg)
        if log is not None:
            log(msg)

    with contextlib.ExitStack() as stack:
        if src_path.is_dir():
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".lorc-hf-", dir=dst_path.parent)))
            notice("converting the HF folder with llama.cpp's convert_hf_to_gguf.py (f16) first")
            gguf_path, source_format = convert_folder(src_path, tmp / "model-f16.gguf"), "hf"
        else:
            gguf_path, source_format = src_path, "gguf"
        stages = _Stages()
        model = open_gguf(gguf_path)
        stages.done("load")
        opts = opts.for_model(model.shape, notice)
        quantized = model.quantized_weight_types()
        if quantized:
            notice(f"K/V weights are quantized ({', '.join(quantized)}): factors are computed from "
                   "the dequantized weights")

        n_weights = 2 * model.shape.n_layer
        with tqdm(total=n_weights, desc="spectra", unit="w", disable=not opts.progress, leave=False) as bar:
            spectra = compute_spectra(model.iter_weights(), on_step=lambda: bar.update(1))
        stages.done("spectra")
        qtype = OUTTYPES[opts.outtype]
        # ranks that do not depend on the statistics are settled (and refused if the factor type
        # cannot hold them) before a calibration run that may take minutes
        allocation = None if _ranks_need_statistics(opts) else _allocate(model, spectra, opts)
        if allocation is not None:
            _check_factor_shapes(model, allocation, qtype)
        stages.done("allocate")
        stats = _statistics(model, opts, notice, dst_path.parent)
        if stats is not None and stats.files is not None and stats is not opts.calibration:
            stack.callback(stats.files.cleanup)  # spilled statistics go with the conversion
        stages.done("calibration")
        weighting = _Weighting(model, stats, opts.aware)
        if allocation is None:
            allocation = _allocate(model, spectra, opts, weighting)
            _check_factor_shapes(model, allocation, qtype)
            stages.done("allocate")
        layers = factorized_layers(model.shape)
        if len(layers) < model.shape.n_layer and opts.allocation != allocate.EXPLICIT:
            notice(f"{model.shape.architecture} uses sliding-window attention: ranks go to its {len(layers)} global "
                   f"layers (the ratio is theirs); its {model.shape.n_layer - len(layers)} sliding-window layers keep "
                   "dense K/V, their cache bounded by the window")
        for msg in (_ratio_notices(allocation.over(layers), opts)
                    + _top_k_notices(allocation, opts)):
            notice(msg)

        errors: dict[tuple[Side, int], float] = {}
        hybrid = opts.sink_tokens > 0 or opts.recent_window > 0
        plan = _plan_tensors(model, allocation, qtype, errors, weighting, keep_dense=hybrid)
        metadata = copy_metadata(model.reader) + _lorc_metadata(model.shape.architecture, allocation, opts.method,
                                                                opts.sink_tokens, opts.recent_window,
                                                                opts.top_k_for(model.shape, allocation))
        alignment = model.meta.get(gguf.Keys.General.ALIGNMENT)
        write_gguf(dst_path, model.shape.architecture, metadata, plan, alignment=alignment, progress=opts.progress)
        stages.done("factorize and write")
        bytes_in = gguf_path.stat().st_size
        shape = model.shape
        del model, plan  # release the memory map before a temporary HF GGUF is deleted

    info = RunInfo(source=str(src_path), source_format=source_format, output=str(dst_path), outtype=opts.outtype,
                   ratio=None if allocation.method == allocate.EXPLICIT else opts.ratio,
                   key_ratio=opts.key_ratio, value_ratio=opts.value_ratio, rank_multiple=opts.rank_multiple,
                   notices=tuple(notices), elapsed_s=time.perf_counter() - started,
                   bytes_in=bytes_in, bytes_out=dst_path.stat().st_size)
    report = build_report(shape, spectra, allocation, errors, info)
    _add_aware_report(report, opts, stats, weighting)
    report["seconds"] = stages.seconds
    write_report(report, report_path(dst_path))
    return report


__all__ = ["ConvertOptions", "convert", "format_summary", "LorcError"]
