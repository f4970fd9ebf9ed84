"""A thin driver over llama-cpp-python's low-level API for what ``llama_cpp.Llama`` does not
expose: several sequences in one context, explicit positions, sequence operations (rm/cp/keep/
add) and per-sequence state. Used by the evaluation tools and the runtime tests.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .library import free_context, llama_cpp as _lib, llama_log_text
from .tokens import tokenize


CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}

# SessionParams fields passed as the llama_context_params fields of the same names (-1 for None)
LORC_SETTINGS = ("lorc_sink_tokens", "lorc_recent_window", "lorc_prefill_block", "lorc_top_k", "lorc_attend_rest")


@dataclass(frozen=True)
class SessionParams:
    n_ctx: int = 512
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 1
    flash_attn: bool = False
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    kv_unified: bool = False
    # sliding-window models: False sizes their local layers' cache to the window (llama.cpp's
    # default is the full context)
    swa_full: bool = True
    n_threads: int = max(1, os.cpu_count() or 1)
    # the LoRC runtime's settings (llama_context_params), None = the file's default: exact K/V for
    # the first sink tokens and a recent window ((0, 0) = plain latent cache), prompt queries per
    # block of the exact window's attention (0 = one block), latent keys rebuilt per decoded token
    # (0 = every key), the latent cells a decoded token does not rebuild attended at their score's
    # logits (1, the runtime's default) or left out (0)
    lorc_sink_tokens: int | None = None
    lorc_recent_window: int | None = None
    lorc_prefill_block: int | None = None
    lorc_top_k: int | None = None
    lorc_attend_rest: int | None = None
    # where a GPU build runs the model: None = llama.cpp's defaults (every layer on the first GPU
    # device, host-weight ops offloaded for large batches); n_gpu_layers=0 with op_offload=False keeps
    # every op on the CPU backend of the same library (the reference of tests/test_vulkan.py)
    n_gpu_layers: int | None = None
    op_offload: bool | None = None


def _logged_mib(log: Sequence[str], what: str) -> int | None:
    """Bytes of every ``<what> = X MiB`` line of llama.cpp's log text, summed; None where there is none."""
    sizes = re.findall(re.escape(what) + r" =\s*([0-9.]+) MiB", "".join(log))
    return round(sum(float(x) for x in sizes) * 2**20) if sizes else None


class Session:
    """One model + one context. ``decode`` takes (token, position, seq_id) triples."""

    def __init__(self, model_path: str | os.PathLike, params: SessionParams = SessionParams()):
        lib = _lib()
        self.lib = lib
        self.path = Path(model_path)
        self.params = params
        # bindings without the LoRC fields (an older runtime) would take the attributes and pass nothing
        fields = {name for name, _ in lib.llama_context_params._fields_}
        missing = [n for n in LORC_SETTINGS if getattr(params, n) is not None and n not in fields]
        if missing:
            raise RuntimeError(f"the installed llama_cpp has no {', '.join(missing)} context parameter: "
                               "rebuild the runtime (tools/build_runtime.py)")
        mparams = lib.llama_model_default_params()
        if params.n_gpu_layers is not None:
            mparams.n_gpu_layers = params.n_gpu_layers
        self.model = lib.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path} (see its log for the reason)")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = params.n_ctx
        cparams.n_batch = params.n_batch
        cparams.n_ubatch = params.n_ubatch
        cparams.n_seq_max = params.n_seq_max
        cparams.kv_unified = params.kv_unified
        cparams.swa_full = params.swa_full
        if params.op_offload is not None:
            cparams.op_offload = params.op_offload
        cparams.n_threads = params.n_threads
        cparams.n_threads_batch = params.n_threads
        cparams.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if params.flash_attn
                                   else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cparams.type_k = CACHE_TYPES[params.cache_type_k]
        cparams.type_v = CACHE_TYPES[params.cache_type_v]
        for name in LORC_SETTINGS:
            if name in fields:
                value = getattr(params, name)
                setattr(cparams, name, -1 if value is None else value)
        with llama_log_text() as log:
            self.ctx = lib.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                lib.llama_model_free(self.model)
                raise RuntimeError(f"llama.cpp could not create a context for {model_path} with {params}")
        # what llama.cpp allocated for this context, summed over its backends (None where it logged
        # none): the KV cache's buffers (every store of a LoRC cache), and the compute buffers it
        # reserved for its graphs (the largest it may run: a full ubatch at the full context)
        self.kv_buffer_bytes = _logged_mib(log, "KV buffer size")
        self.compute_buffer_bytes = _logged_mib(log, "compute buffer size")
        self.mem = lib.llama_get_memory(self.ctx)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self._batch = lib.llama_batch_init(params.n_batch, 0, max(1, params.n_seq_max))

    def close(self) -> None:
        if getattr(self, "ctx", None):
            free_context(self.lib, self._batch, self.ctx, self.model)
            self.ctx = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # --- tokens -------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return tokenize(self.lib, self.vocab, text, add_bos, special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        out = b""
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            n = self.lib.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
            out += buf.raw[:max(n, 0)]
        return out.decode(errors="replace")

    # --- decoding -----------------------------------------------------------------------------
    def decode(self, items: Iterable[tuple[int, int, int]], logits: bool = True) -> np.ndarray:
        """Decode (token, pos, seq_id) items in chunks of n_batch; returns their logits
        [n_items, n_vocab] (empty when ``logits`` is False)."""
        items = list(items)
        rows = []
        for start in range(0, len(items), self.params.n_batch):
            chunk = items[start:start + self.params.n_batch]
            b = self._batch
            b.n_tokens = len(chunk)
            for i, (tok, pos, seq) in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = logits
            rc = self.lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            if logits:
                for i in range(len(chunk)):
                    ptr = self.lib.llama_get_logits_ith(self.ctx, i)
                    rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return np.stack(rows) if rows else np.zeros((0, self.n_vocab), np.float32)

    def decode_seq(self, tokens: Sequence[int], pos0: int = 0, seq_id: int = 0, logits: bool = True) -> np.ndarray:
        return self.decode(((t, pos0 + i, seq_id) for i, t in enumerate(tokens)), logits)

    # --- memory ---------------------------------------------------------------------------------
    def clear(self) -> None:
        self.lib.llama_memory_clear(self.mem, True)

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        return bool(self.lib.llama_memory_seq_rm(self.mem, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self.lib.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_keep(self, seq_id: int) -> None:
        self.lib.llama_memory_seq_keep(self.mem, seq_id)

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        self.lib.llama_memory_seq_add(self.mem, seq_id, p0, p1, delta)

    def seq_pos_max(self, seq_id: int) -> int:
        return int(self.lib.llama_memory_seq_pos_max(self.mem, seq_id))

    # --- state ----------------------------------------------------------------------------------
    def seq_state_size(self, seq_id: int = 0) -> int:
        return int(self.lib.llama_state_seq_get_size(self.ctx, seq_id))

    def seq_state(self, seq_id: int = 0) -> bytes:
        size = self.seq_state_size(seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = self.lib.llama_state_seq_get_data(self.ctx, buf, size, seq_id)
        return bytes(buf[:n])

    def set_seq_state(self, data: bytes, seq_id: int = 0) -> None:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if self.lib.llama_state_seq_set_data(self.ctx, buf, len(data), seq_id) == 0:
            raise RuntimeError("llama_state_seq_set_data failed")

    def kv_bytes_per_token(self, tokens: Sequence[int], seq_id: int = 0) -> float:
        """KV bytes per token from the runtime: growth of the serialized sequence state between
        half and all of ``tokens`` (the difference cancels the fixed header)."""
        half = len(tokens) // 2
        if half < 1:
            raise ValueError("need at least two tokens")
        self.seq_rm(seq_id, -1, -1)
        self.decode_seq(tokens[:half], 0, seq_id, logits=False)
        small = self.seq_state_size(seq_id)
        self.decode_seq(tokens[half:], half, seq_id, logits=False)
        large = self.seq_state_size(seq_id)
        self.seq_rm(seq_id, -1, -1)
        return (large - small) / (len(tokens) - half)
