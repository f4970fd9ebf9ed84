"""Calibration statistics collected by llama.cpp itself, through a graph evaluation callback."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from ..errors import LorcError
from ..format.read import SourceModel
from ..runtime.library import free_context, silence_llama_logs
from .statistics import CalibrationStats, LayerStats, Progress

# the graph node whose output every K/V projection reads: llama.cpp names it cb(cur, "attn_norm", il)
# in the llama, qwen2 and gemma3 graphs (the norm with its gain applied)
# the graph node whose output every K/V projection reads: llama.cpp names it cb(cur, "attn_norm", il)
# in the llama, qwen2 and gemma3 graphs (the norm with its gain applied)
KV_INPUT_NODE = "attn_norm"


class _Ggml:
    """The few ggml functions an evaluation callback needs, from the library llama-cpp-python loaded."""

    def __init__(self) -> None:
        import llama_cpp.llama_cpp as ll
        from llama_cpp._ctypes_extensions import load_shared_library

        lib = load_shared_library("ggml-base", ll._base_path)
        lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        lib.ggml_nelements.restype, lib.ggml_nelements.argtypes = ctypes.c_int64, [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.lib = lib

    def name(self, t: int) -> str:
        return self.lib.ggml_get_name(t).decode()

    def read_f32(self, t: int, out: np.ndarray) -> np.ndarray:
        """The tensor's elements (f32, contiguous: what a norm produces) into ``out``, on any backend."""
        n = int(self.lib.ggml_nelements(t))
        view = out[:n]
        self.lib.ggml_backend_tensor_get(t, view.ctypes.data, 0, 4 * n)
        return view


class RuntimeStats:
    """Per-layer K/V input statistics collected by llama.cpp itself: the model runs on its own
    (quantized, memory-mapped) weights, and a graph evaluation callback (``cb_eval``, as
    ``llama-imatrix`` uses) copies every ``attn_norm`` output and accumulates its sums in float64.
    Runs on whatever backend the runtime was built for."""

    def __init__(self, path: Path, n_layer: int, n_embd: int, n_ctx: int, full: bool = True,
                 threads: int | None = None) -> None:
        import llama_cpp as lib

        silence_llama_logs()
        self.lib, self.ggml = lib, _Ggml()
        self.n_layer, self.n_embd, self.n_ctx = n_layer, n_embd, n_ctx
        self.s1 = np.zeros((n_layer, n_embd))
        self.s2 = np.zeros((n_layer, n_embd))
        self.second = [np.zeros((n_embd, n_embd)) for _ in range(n_layer)] if full else None
        self.count = np.zeros(n_layer, dtype=np.int64)
        self._buf = np.empty(n_ctx * n_embd, dtype=np.float32)
        self._error: BaseException | None = None
        self._callback = lib.ggml_backend_sched_eval_callback(self._on_node)
        mparams = lib.llama_model_default_params()
        # the weights stay in the file's memory map: the CPU backend's repacked copies of quantized
        # weights (extra buffer types) would add the whole model to anonymous memory, on top of the
        # float64 accumulators (at 8B shapes 8.5 GB of anonymous memory mid-calibration with them,
        # results/bench-convert-8b.md without), for a forward that runs once
        mparams.use_extra_bufts = False
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise LorcError(f"llama.cpp could not load {path} for calibration")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        threads = threads or max(1, os.cpu_count() or 1)
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.cb_eval = self._callback
        cparams.cb_eval_user_data = None
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise LorcError(f"llama.cpp could not create a context of {n_ctx} tokens for calibration")
        self.batch = lib.llama_batch_init(n_ctx, 0, 1)

    def _on_node(self, t: int, ask: bool, user_data: int) -> bool:
        # runs inside llama_decode: an exception cannot cross the C frames, so it is kept and the
        # computation stopped (returning False), and run() raises it
        try:
            name = self.ggml.name(t)
            prefix, _, layer = name.rpartition("-")
            if prefix != KV_INPUT_NODE:
                return not ask
            if ask:
                return True
            x = self.ggml.read_f32(t, self._buf).reshape(-1, self.n_embd)
            il = int(layer)
            x64 = x.astype(np.float64)
            self.s1[il] += x64.sum(0)
            self.s2[il] += np.square(x64).sum(0)
            if self.second is not None:
                self.second[il] += x64.T @ x64
            self.count[il] += x.shape[0]
            return True
        except BaseException as e:  # noqa: BLE001 (KeyboardInterrupt included)
            self._error = e
            return False

    def run(self, chunk: np.ndarray) -> None:
        lib, b = self.lib, self.batch
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        b.n_tokens = len(chunk)
        for i, tok in enumerate(chunk):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(tok), i, 1, 0
            b.seq_id[i][0] = 0
        b.logits[len(chunk) - 1] = 1
        rc = lib.llama_decode(self.ctx, b)
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if rc != 0:
            raise LorcError(f"llama_decode failed ({rc}) during calibration")

    def finish(self, n_tokens: int) -> CalibrationStats:
        layers = []
        for il in range(self.n_layer):
            n = max(int(self.count[il]), 1)
            if self.count[il] != n_tokens:
                raise LorcError(f"calibration saw {self.count[il]} inputs of layer {il}, expected {n_tokens}: "
                                f"the runtime's graph has no '{KV_INPUT_NODE}-{il}' node for this architecture")
            second = None
            if self.second is not None:  # each float64 accumulator goes as its float32 mean is made
                second, self.second[il] = (self.second[il] / n).astype(np.float32), None
            layers.append(LayerStats(count=int(self.count[il]), mean=self.s1[il] / n, mean_sq=self.s2[il] / n,
                                     second=second))
        return CalibrationStats(layers=layers, n_tokens=n_tokens, source="calibration")

    def close(self) -> None:
        if getattr(self, "ctx", None):
            free_context(self.lib, self.batch, self.ctx, self.model)
            self.ctx = None

    def __enter__(self) -> RuntimeStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect_stats_runtime(model: SourceModel, chunks: np.ndarray, *, full: bool = True,
                          progress: Progress | None = None, threads: int | None = None) -> CalibrationStats:
    """``collect_stats`` through the runtime (``RuntimeStats``); no query statistics (q_pair)."""
    sh = model.shape
    with RuntimeStats(model.path, sh.n_layer, sh.n_embd, chunks.shape[1], full=full, threads=threads) as rt:
        for i, chunk in enumerate(chunks):
            rt.run(chunk)
            if progress is not None:
                progress(i + 1, len(chunks))
        return rt.finish(int(chunks.size))
