"""Decoding with a ``Session``: logits only where they are needed, the model's chat template, and
greedy generation (what the evaluation tools run on the patched runtime)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from ..errors import LorcError
from .session import Session


def decode_tokens(session: Session, tokens: Sequence[int], pos0: int = 0, outputs_from: int | None = None,
                  seq_id: int = 0) -> np.ndarray:
    """Decode ``tokens`` at positions ``pos0...`` in chunks of n_batch, asking llama.cpp for logits
    only at indices ``>= outputs_from`` (None: only the last token). Returns those logits,
    ``[n_outputs, n_vocab]`` float32."""
    lib, n = session.lib, len(tokens)
    first = n - 1 if outputs_from is None else max(0, outputs_from)
    rows = []
    nb = session.params.n_batch
    for start in range(0, n, nb):
        chunk = tokens[start:start + nb]
        b = session._batch
        b.n_tokens = len(chunk)
        n_out = 0
        for i, tok in enumerate(chunk):
            b.token[i] = tok
            b.pos[i] = pos0 + start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_id
            want = start + i >= first
            b.logits[i] = want
            n_out += want
        rc = lib.llama_decode(session.ctx, b)
        if rc != 0:
            raise LorcError(f"llama_decode returned {rc} (context full or out of memory?)")
        if n_out:
            ptr = lib.llama_get_logits(session.ctx)
            rows.append(np.ctypeslib.as_array(ptr, shape=(n_out, session.n_vocab)).copy())
    return np.concatenate(rows) if rows else np.zeros((0, session.n_vocab), np.float32)


def bos_token(session: Session) -> int | None:
    bos = int(session.lib.llama_vocab_bos(session.vocab))
    return bos if bos >= 0 else None


def chat_prompt(session: Session, user: str) -> str:
    """``user`` as one user turn in the model's chat template with the assistant turn opened; the
    plain text when the model has no template."""
    lib = session.lib
    tmpl = lib.llama_model_chat_template(session.model, None)
    if not tmpl:
        return user
    msgs = (lib.llama_chat_message * 1)()
    role, content = b"user", user.encode()
    msgs[0].role, msgs[0].content = role, content
    size = 4 * (len(content) + len(tmpl)) + 256
    buf = ctypes.create_string_buffer(size)
    n = lib.llama_chat_apply_template(tmpl, msgs, 1, True, buf, size)
    if n < 0:
        return user
    if n > size:
        buf = ctypes.create_string_buffer(n)
        n = lib.llama_chat_apply_template(tmpl, msgs, 1, True, buf, n)
    return buf.raw[:n].decode(errors="replace")


def tokenize_chat(session: Session, text: str) -> list[int]:
    """Tokens of a templated chat prompt: special tokens (``<|im_start|>``...) parsed as such, BOS
    added only where the vocabulary asks for it (as llama.cpp's chat tools do)."""
    return session.tokenize(text, add_bos=True, special=True)


def generate_greedy(session: Session, prompt_tokens: Sequence[int], max_tokens: int) -> list[int]:
    """Greedy (argmax) continuation of ``prompt_tokens`` until an end-of-generation token or
    ``max_tokens``; the end token is not included."""
    if len(prompt_tokens) + max_tokens > session.params.n_ctx:
        raise LorcError(f"prompt ({len(prompt_tokens)} tokens) + {max_tokens} new tokens exceed the "
                        f"context of {session.params.n_ctx}")
    session.clear()
    logits = decode_tokens(session, prompt_tokens)[-1]
    out: list[int] = []
    pos = len(prompt_tokens)
    for _ in range(max_tokens):
        tok = int(np.argmax(logits))
        if session.lib.llama_vocab_is_eog(session.vocab, tok):
            break
        out.append(tok)
        logits = decode_tokens(session, [tok], pos)[-1]
        pos += 1
    return out
