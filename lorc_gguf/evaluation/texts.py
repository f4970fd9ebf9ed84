"""The texts perplexity is measured on: the evaluation domains of ``corpus`` (by default ``news``
and ``drama``, which the calibration text never contains, and ``docs``, the pydoc half disjoint
from the calibration half) or any UTF-8 file."""

from __future__ import annotations

import os
from pathlib import Path

from .. import corpus
from ..errors import LorcError

# the evaluation texts of tools/eval.py by default: the domains calibration never sees, then the
# documentation half that it does (in-domain, for comparison with earlier numbers)
DEFAULT_TEXTS = corpus.HELD_OUT_DOMAINS + ("docs",)


def read_text(spec: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(text, description) of an evaluation domain of ``corpus`` (``news``, ``drama``, ``docs``)
    or of a text file; ``None`` is the docs domain (the pydoc evaluation half)."""
    if spec is None:
        spec = "docs"
    if str(spec) in corpus.DOMAINS:
        d = corpus.domain(str(spec))
        return d.text(corpus.EVALUATION), f"{d.name} ({d.genre}: {d.source})"
    p = Path(spec)
    if not p.is_file():
        raise LorcError(f"text not found: {p} is neither a file nor a domain "
                        f"({', '.join(corpus.EVALUATION_DOMAINS)})")
    return p.read_text(encoding="utf-8", errors="replace"), str(p)


def parse_texts(spec: str | None) -> list[str]:
    """``--text``: comma-separated domains and/or files (default ``DEFAULT_TEXTS``)."""
    if spec is None:
        return list(DEFAULT_TEXTS)
    items = [x.strip() for x in spec.split(",") if x.strip()]
    if not items:
        raise LorcError("--text names no text")
    if len(set(items)) != len(items):
        raise LorcError(f"--text names a text twice: {spec}")
    return items
