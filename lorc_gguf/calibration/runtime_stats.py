"""Calibration statistics collected by llama.cpp itself, through a graph evaluation callback."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from ..errors import LorcError
from ..format.read import SourceModel
from ..runtime.library import free_context, silence_llama_logs
from .statistics import CalibrationStats, LayerSums, Progress, second_file, spill_folder, spills

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


# x x^T of the runtime's inputs in float32 blocks of this many rows (see LayerSums)
BLOCK_ROWS = 512


class RuntimeStats:
    """Per-layer K/V input statistics collected by llama.cpp itself: the model runs on its own
    (quantized, memory-mapped) weights, and a graph evaluation callback (``cb_eval``, as
    ``llama-imatrix`` uses) copies every ``attn_norm`` output. The sums are made after each
    ``llama_decode`` returns, not inside the callback: BLAS threads started there contend with
    llama.cpp's own (measured on SmolLM2, 2 cores: 13.0 s for 2,048 tokens inside, 6.4 s after,
    6.0 s for the forward alone).

    ``spill_dir``: the inputs of every chunk go to files there (one per layer), and ``finish`` reduces them one
    layer at a time, its E[x x^T] into a second file (memory-mapped): for models whose
    accumulators do not fit in memory (``statistics.spills``). Without it one chunk's inputs
    are held and added to every layer's float64 sums."""

    def __init__(self, path: Path, n_layer: int, n_embd: int, n_ctx: int, full: bool = True,
                 threads: int | None = None, spill_dir: Path | None = None, n_tokens: int = 0) -> None:
        import llama_cpp as lib

        silence_llama_logs()
        self.lib, self.ggml = lib, _Ggml()
        self.n_layer, self.n_embd, self.n_ctx, self.full = n_layer, n_embd, n_ctx, full
        self.spill_dir = spill_dir
        self.rows = np.zeros(n_layer, dtype=np.int64)  # inputs of each layer seen so far
        self._before = self.rows.copy()
        self._offset = 0  # where this chunk's rows start in the spilled inputs
        if spill_dir is None:
            self.sums: list[LayerSums] | None = [self._sums() for _ in range(n_layer)]
            self.acts = np.empty((n_layer, n_ctx, n_embd), dtype=np.float32)
        else:
            self.sums = None
            # a file per layer, each removed once reduced: the disk holds the inputs and the second
            # moments made so far, never both in full (70B, 4,096 tokens: 10.7 and 21.5 GB)
            self.acts = [np.lib.format.open_memmap(self._inputs_path(il), mode="w+", dtype=np.float32,
                                                   shape=(n_tokens, n_embd)) for il in range(n_layer)]
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
            il = int(layer)
            if self.rows[il] != self._before[il]:
                raise LorcError(f"layer {il}'s K/V input came twice in one batch")
            out = self.acts[il][self._offset:self._offset + self.n_ctx].reshape(-1)
            n = self.ggml.read_f32(t, out).size // self.n_embd
            self.rows[il] += n
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
        before = self._before = self.rows.copy()
        rc = lib.llama_decode(self.ctx, b)
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if rc != 0:
            raise LorcError(f"llama_decode failed ({rc}) during calibration")
        if self.sums is not None:
            for il, s in enumerate(self.sums):
                self._add_chunk(s, self.acts[il][:self.rows[il] - before[il]])
        else:
            self._offset += len(chunk)

    def finish(self, n_tokens: int, progress: Progress | None = None) -> CalibrationStats:
        for il in range(self.n_layer):
            if self.rows[il] != n_tokens:
                raise LorcError(f"calibration saw {self.rows[il]} inputs of layer {il}, expected {n_tokens}: "
                                f"the runtime's graph has no '{KV_INPUT_NODE}-{il}' node for this architecture")
        layers = []
        if self.sums is not None:
            for il in range(self.n_layer):  # each float64 accumulator goes as its float32 mean is made
                layers.append(self.sums[il].finish())
                self.sums[il] = None  # type: ignore[call-overload]
            return CalibrationStats(layers=layers, n_tokens=n_tokens, source="calibration")
        assert self.spill_dir is not None
        self.close()  # the forward is done: its buffers go before the reduction
        second = second_file(self.spill_dir, self.n_layer, self.n_embd) if self.full else None
        for il in range(self.n_layer):
            s = self._sums()
            for i in range(0, n_tokens, self.n_ctx):  # chunk by chunk, as in memory: the same sums
                self._add_chunk(s, self.acts[il][i:i + self.n_ctx])
            layers.append(s.finish(None if second is None else second[il]))
            self.acts[il] = None  # type: ignore[call-overload]
            self._inputs_path(il).unlink()
            if progress is not None:
                progress(il + 1, self.n_layer)
        return CalibrationStats(layers=layers, n_tokens=n_tokens, source="calibration")

    def _sums(self) -> LayerSums:
        return LayerSums(self.n_embd, self.full, block_rows=BLOCK_ROWS)

    @staticmethod
    def _add_chunk(sums: LayerSums, x: np.ndarray) -> None:
        """One calibration chunk's inputs, in position order."""
        sums.add(x)
        sums.add_first(x[0])

    def _inputs_path(self, il: int) -> Path:
        assert self.spill_dir is not None
        return self.spill_dir / f"inputs-{il}.npy"

    def close(self) -> None:
        if getattr(self, "ctx", None):
            free_context(self.lib, self.batch, self.ctx, self.model)
            self.ctx = None

    def __enter__(self) -> RuntimeStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect_stats_runtime(model: SourceModel, chunks: np.ndarray, *, full: bool = True,
                          progress: Progress | None = None, threads: int | None = None,
                          spill_dir: str | Path | None = None, memory_bytes: int | None = None) -> CalibrationStats:
    """``collect_stats`` through the runtime (``RuntimeStats``); no query statistics (q_pair).
    When every layer's float64 accumulators would exceed ``memory_bytes`` (``statistics.spills``),
    the inputs spill to a temporary folder in ``spill_dir`` (the system's temporary folder by
    default; the converter passes the output's folder) and the returned statistics' second
    moments are memory-mapped from a file there, removed with the statistics."""
    sh = model.shape
    spill = full and spills(sh.n_layer, sh.n_embd, memory_bytes)
    files = spill_folder(spill_dir) if spill else None
    n_chunks = len(chunks)
    steps = n_chunks + (sh.n_layer if spill else 0)
    try:
        with RuntimeStats(model.path, sh.n_layer, sh.n_embd, chunks.shape[1], full=full, threads=threads,
                          spill_dir=None if files is None else Path(files.name), n_tokens=int(chunks.size)) as rt:
            for i, chunk in enumerate(chunks):
                rt.run(chunk)
                if progress is not None:
                    progress(i + 1, steps)
            stats = rt.finish(int(chunks.size), None if progress is None else
                              (lambda done, _total: progress(n_chunks + done, steps)))
    except BaseException:
        if files is not None:
            files.cleanup()
        raise
    stats.files = files
    return stats
