"""What calibration runs through the model: the calibration text (by default the built-in domains
of ``corpus``, chats in the model's own template) cut into chunks of ``n_ctx`` tokens with
llama.cpp's tokenizer, the first token of each replaced by BOS as llama-perplexity does."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import corpus
from ..errors import LorcError
from ..format.read import SourceModel
from ..runtime.tokens import Tokenizer, make_chunks, with_bos

DEFAULT_CALIB_TOKENS = 16384
DEFAULT_CTX = 512


def chat_renderer(model: SourceModel) -> corpus.ChatRender:
    """The model's chat template (``tokenizer.chat_template``), or a plain User:/Assistant: form."""
    template = model.meta.get("tokenizer.chat_template")
    if not template:
        return corpus.plain_chat
    eos = ""
    eos_id, tokens = model.meta.get("tokenizer.ggml.eos_token_id"), model.meta.field("tokenizer.ggml.tokens")
    if eos_id is not None and tokens is not None and 0 <= int(eos_id) < len(tokens.data):
        eos = tokens.contents(int(eos_id))
    return corpus.template_renderer(str(template), eos)


# characters of text cut for one chunk of n_ctx tokens: tokens run 2.5-4.5 characters in every
# domain (SmolLM2 and Gemma 3 tokenizers), so a chunk always fills with room to spare
SEGMENT_CHARS_PER_TOKEN = 12


def segment_starts(n_chars: int, segment: int, n: int, text: str) -> list[int]:
    """``n`` start offsets spread evenly over a text of ``n_chars``, each moved to the next line
    start, leaving room for a ``segment`` after it."""
    last = max(n_chars - segment, 0)
    starts = []
    for i in range(n):
        at = (i * last) // max(n, 1)
        nl = text.find("\n", at, at + segment // 2)
        starts.append(at if nl < 0 else nl + 1)
    return starts


def calibration_chunks(model: SourceModel, text: str | None = None, n_tokens: int = DEFAULT_CALIB_TOKENS,
                       n_ctx: int = DEFAULT_CTX, domains: Sequence[str] | None = None) -> tuple[np.ndarray, dict]:
    """(n_chunks, n_ctx) calibration tokens and a description of where they came from.

    ``text`` is one text, cut into consecutive chunks; without it the built-in domains (default:
    every calibration domain of ``corpus``) share the chunks equally, each domain's chunks cut from
    segments spread evenly over its text (only those segments are tokenized)."""
    tok = Tokenizer(model.path)
    try:
        if text is not None:
            tokens = tok.tokenize(text, add_bos=False)
            n_ctx = max(2, min(n_ctx, n_tokens, len(tokens)))
            chunks = make_chunks(tokens, n_ctx, tok.bos, max_chunks=max(1, n_tokens // n_ctx))
            return chunks, {"n_ctx": n_ctx, "n_chunks": int(chunks.shape[0])}
        names = corpus.parse_domains(domains or corpus.CALIBRATION_DOMAINS, corpus.CALIBRATION)
        render = chat_renderer(model)
        n_ctx = max(2, min(n_ctx, n_tokens))
        n_chunks = max(1, n_tokens // n_ctx)
        per = [n_chunks // len(names) + (1 if i < n_chunks % len(names) else 0) for i in range(len(names))]
        rows, used = [], {}
        segment = n_ctx * SEGMENT_CHARS_PER_TOKEN
        for name, n in zip(names, per):
            d = corpus.domain(name)
            body = d.text(corpus.CALIBRATION, render)
            for start in segment_starts(len(body), segment, n, body):
                ids = tok.tokenize(body[start:start + segment], add_bos=False, special=d.chat)
                if len(ids) < n_ctx:
                    raise LorcError(f"the {name} text is too short for chunks of {n_ctx} tokens")
                rows.append(ids[:n_ctx])
            used[name] = n
        chunks = with_bos(np.asarray(rows, dtype=np.int64), tok.bos)
        return chunks, {"n_ctx": n_ctx, "n_chunks": int(chunks.shape[0]), "domains": used}
    finally:
        tok.close()
