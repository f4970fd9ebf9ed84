"""The built-in English text: ``pydoc_data.topics`` (shipped with every Python), split once into a
calibration half and an evaluation half. Calibration (``calibrate``) and evaluation (``evaluate``,
``tools/quality_table.py``, ``tools/bench.py``) all take their text from here, so the two halves
never overlap and every tool scores the same tokens."""

from __future__ import annotations


def pydoc_text() -> str:
    """The ``pydoc_data.topics`` texts joined in sorted key order (deterministic for a Python)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _split_point(text: str) -> int:
    # at a line start just past the middle, so that neither half begins mid-word
    mid = len(text) // 2
    nl = text.find("\n", mid)
    return mid if nl < 0 else nl + 1


def calibration_text() -> str:
    """First half of the pydoc text (disjoint from ``eval_text``)."""
    text = pydoc_text()
    return text[:_split_point(text)]


def eval_text() -> str:
    """Second half of the pydoc text (disjoint from ``calibration_text``)."""
    text = pydoc_text()
    return text[_split_point(text):]
