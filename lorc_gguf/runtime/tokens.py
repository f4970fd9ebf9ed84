"""Tokens through llama.cpp's own tokenizer, and the chunks every perplexity and calibration run
is cut into.

``tokenize`` serves a ``Session`` (a full model) and a ``Tokenizer`` (a vocabulary-only load) alike;
``make_chunks`` cuts token ids into chunks whose first token is replaced by BOS, as
llama-perplexity does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import LorcError
from .library import silence_llama_logs


def tokenize(lib, vocab, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
    """Token ids of ``text`` in ``vocab``; ``special`` parses control tokens (a chat template's
    markers)."""
    data = text.encode()
    n_max = len(data) + 16
    buf = (lib.llama_token * n_max)()
    n = lib.llama_tokenize(vocab, data, len(data), buf, n_max, add_bos, special)
    if n < 0:
        raise LorcError("tokenization failed")
    return list(buf[:n])


class Tokenizer:
    """llama.cpp's tokenizer of a GGUF (vocab-only load through llama-cpp-python)."""

    def __init__(self, path: str | Path) -> None:
        import llama_cpp as lib

        silence_llama_logs()
        self.lib = lib
        params = lib.llama_model_default_params()
        params.vocab_only = True
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise LorcError(f"llama.cpp could not load the vocabulary of {path}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.bos = int(lib.llama_vocab_bos(self.vocab))

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        return tokenize(self.lib, self.vocab, text, add_bos, special)

    def close(self) -> None:
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass


def make_chunks(tokens: Sequence[int], n_ctx: int, bos: int | None, max_chunks: int | None = None) -> np.ndarray:
    """(n_chunks, n_ctx) token ids: up to ``max_chunks`` consecutive chunks of ``n_ctx`` tokens,
    the first token of each replaced by BOS (as llama-perplexity does when the vocabulary has one:
    ``bos`` None or negative keeps the text's token)."""
    n = len(tokens) // n_ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n < 1:
        raise LorcError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
    return with_bos(np.asarray(tokens[:n * n_ctx], dtype=np.int64).reshape(n, n_ctx).copy(), bos)


def with_bos(chunks: np.ndarray, bos: int | None) -> np.ndarray:
    """``chunks`` (n_chunks, n_ctx) with each first token replaced by BOS, in place; unchanged when
    the vocabulary has none (``bos`` None or negative)."""
    if bos is not None and bos >= 0:
        chunks[:, 0] = bos
    return chunks
