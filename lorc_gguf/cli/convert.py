"""``tools/convert.py`` (``lorc-convert``): a GGUF or HF safetensors folder to a LoRC GGUF."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..calibration import BACKENDS, DEFAULT_CALIB_TOKENS
from ..converter import allocate, aware
from ..converter.factorize import OUTTYPES
from ..converter.pipeline import ALLOCATIONS, convert
from ..converter.report import format_summary
from ..errors import LorcError
from ..format import keys
from ..format.keys import report_path
from .common import fail

def convert_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="convert.py",
        description="Factorize the K/V projections of a llama-family model (GGUF or HF safetensors folder) "
                    "by truncated SVD into a LoRC GGUF with a low-rank KV cache.")
    ap.add_argument("model", metavar="MODEL", help="input GGUF (any type; quantized K/V are dequantized) "
                    "or Hugging Face safetensors folder")
    ap.add_argument("out", metavar="OUT", help="output GGUF; the JSON report goes to OUT" + ".lorc.json")
    rule = ap.add_mutually_exclusive_group()
    rule.add_argument("--progressive", dest="allocation", action="store_const", const=allocate.PROGRESSIVE,
                      help="the default: the LoRC paper's progressive rule, shallow layers keep more rank. Calibrated, "
                           "each layer's output error is weighted by how much the layers above it can amplify it "
                           "(cumulative condition number of the whitened weights) and the ranks minimise the "
                           "weighted error; with --data-free, the paper's linear ramp")
    rule.add_argument("--uniform", dest="allocation", action="store_const", const=allocate.UNIFORM,
                      help="the same fraction of every layer's width")
    rule.add_argument("--sensitivity", dest="allocation", action="store_const", const=aware.SENSITIVITY,
                      help="greedy: each +rank-multiple step goes to the (layer, K/V) whose relative output "
                           "error (activation-weighted with --calibration/--imatrix) falls most per cache element")
    rule.add_argument("--allocation", dest="allocation", choices=list(ALLOCATIONS),
                      help="the allocation rule by name (same as the flags above)")
    rule.add_argument("--ranks", metavar="SPEC",
                      help="explicit ranks: k0,v0,k1,v1,... or a JSON file {\"key_rank\": [...], "
                           "\"value_rank\": [...]} (a previous report works)")
    ap.add_argument("--ratio", type=float, default=0.5,
                    help="kept fraction of the KV cache width summed over layers, K and V together "
                         "(default 0.5); with sliding windows over the global layers, the others staying dense")
    ap.add_argument("--key-ratio", type=float, help="separate budget for K (overrides --ratio for K)")
    ap.add_argument("--value-ratio", type=float, help="separate budget for V (overrides --ratio for V)")
    ap.add_argument("--values-only", action="store_true",
                    help="decode-speed preset: keys stay dense (nothing to rebuild when decoding, which is "
                         "where latent keys cost time) and --ratio (or --value-ratio) is the kept fraction of V; "
                         "the KV width kept is (1 + ratio) / 2")
    ap.add_argument("--rank-multiple", type=int, default=keys.RANK_MULTIPLE,
                    help=f"round ranks to multiples of this (default {keys.RANK_MULTIPLE}; q8_0 needs 32)")
    ap.add_argument("--outtype", choices=list(OUTTYPES), default="f16", help="type of the factors (default f16)")
    ap.add_argument("--data-free", action="store_true",
                    help="the LoRC paper's method as published: truncated SVD of the weights alone (no calibration, "
                         "lorc.method = svd), the paper's progressive ranks, the plain latent cache (unless "
                         "--sink-tokens/--recent-window). Measured far worse than the defaults (README)")
    ap.add_argument("--sink-tokens", type=int, default=None, metavar="S",
                    help="exact sinks: the first S positions are attended through exact K/V (keeps the dense "
                         f"attn_k/attn_v in the file; default {keys.DEFAULT_SINK_TOKENS}, 0 with --data-free)")
    ap.add_argument("--recent-window", type=int, default=None, metavar="W",
                    help="exact window: the last W positions are attended through exact K/V (default "
                         f"{keys.DEFAULT_RECENT_WINDOW}, or a sliding-window model's own window if wider; 0 with --data-free; "
                         "the runtime can override both at load time)")
    ap.add_argument("--decode-top-k", type=int, default=None, metavar="K",
                    help="selective reconstruction by default: a decoded token rebuilds only the K latent keys "
                         "per layer that score best in latent space and attends the others at their scores (0 = every key; "
                         "default %d with the exact window, %d for sliding-window models, else 0; the runtime's "
                         "context parameter lorc_top_k overrides it)" % (keys.DEFAULT_DECODE_TOP_K,
                                                                          keys.DEFAULT_DECODE_TOP_K_SWA))
    aw = ap.add_argument_group("activation-aware factorization (minimise the K/V output error on real inputs)")
    aw.add_argument("--method", choices=list(aware.METHODS),
                    help="svd-whiten (default): SVD of W*L, L L^T = E[x x^T] + ridge, on --calibration statistics. "
                         "svd-diag-act: SVD of W*diag(rms(x)) (default with --imatrix). svd: truncated SVD of W "
                         "alone (data-free, the paper)")
    aw.add_argument("--calibration", metavar="TEXT",
                    help="what is run through the model to measure the K/V inputs: 'builtin' (default) = "
                         "technical docs, code, chat dialogue in the model's template and encyclopedic prose in "
                         "equal shares; some of those domains by name (docs,code,dialogue,encyclopedia); a UTF-8 "
                         "text file; or a .npz statistics cache")
    aw.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS,
                    help=f"calibration tokens, in chunks of 512 (default {DEFAULT_CALIB_TOKENS})")
    aw.add_argument("--calibration-backend", choices=BACKENDS, default="auto",
                    help="who runs the model over the calibration text: numpy (a float32 forward, the reference; "
                         "records the query statistics --out-weight needs) or runtime (llama.cpp on the model's own "
                         "memory-mapped weights, through a graph evaluation callback). Default auto: numpy up to "
                         "4 GiB of float32 weights (~1B parameters), runtime above")
    aw.add_argument("--calibration-memory", type=float, metavar="GIB",
                    help="memory the runtime backend's statistics may take (float64, one n_embd^2 matrix per "
                         "layer); larger ones go to a temporary file beside the output and are reduced one layer at "
                         "a time. Default 4 (an 8B model's fit; a 70B model's 43 GB spill)")
    aw.add_argument("--imatrix", metavar="FILE",
                    help="llama.cpp importance matrix (llama-imatrix, GGUF or legacy .dat): per-channel mean "
                         "squares of the K/V inputs, used like the diagonal calibration statistics")
    aw.add_argument("--ridge", type=float, default=aware.DEFAULT_RIDGE,
                    help=f"whitening ridge, relative to the mean input energy (default {aware.DEFAULT_RIDGE})")
    aw.add_argument("--sink-weight", type=float, default=None, metavar="A",
                    help="weight of the calibration chunks' first-position inputs (where attention sinks form) in "
                         "the whitening, relative to all other inputs together (default 1 when the file has no exact "
                         "sink cells, e.g. --sink-tokens 0; else 0)")
    aw.add_argument("--center", action="store_true",
                    help="factorize the centered covariance and fold (W - up.down) E[x] into the K/V bias "
                         "(off by default: it made SmolLM2 worse, the attention-sink token is far from the mean)")
    aw.add_argument("--out-weight", action="store_true",
                    help="also weight the output side (K: query energy per RoPE pair, V: attn_output)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    ap.add_argument("--quiet", "-q", action="store_true", help="print no summary")
    ap.set_defaults(allocation=allocate.PROGRESSIVE)
    return ap


def convert_main(argv: Sequence[str] | None = None) -> int:
    ap = convert_parser()
    args = ap.parse_args(argv)
    if args.values_only:
        if args.key_ratio is not None and args.key_ratio != 1.0:
            ap.error("--values-only keeps keys dense: drop --key-ratio")
        args.value_ratio = args.ratio if args.value_ratio is None else args.value_ratio
        args.key_ratio = 1.0
    try:
        report = convert(args.model, args.out, allocation=args.allocation, ratio=args.ratio,
                         key_ratio=args.key_ratio, value_ratio=args.value_ratio, ranks=args.ranks,
                         rank_multiple=args.rank_multiple, outtype=args.outtype, progress=not args.no_progress,
                         data_free=args.data_free, method=args.method, calibration=args.calibration,
                         calib_tokens=args.calib_tokens, calibration_backend=args.calibration_backend,
                         calibration_memory=args.calibration_memory,
                         imatrix=args.imatrix, ridge=args.ridge, sink_weight=args.sink_weight, center=args.center,
                         out_weight=args.out_weight,
                         sink_tokens=args.sink_tokens, recent_window=args.recent_window,
                         decode_top_k=args.decode_top_k,
                         log=lambda msg: print(f"notice: {msg}", file=sys.stderr))
    except LorcError as e:
        return fail(str(e))
    if not args.quiet:
        print(format_summary(report))
        print(f"report: {report_path(args.out)}")
    return 0
