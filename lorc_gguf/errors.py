"""The one exception type a user of lorc-gguf is meant to see."""

from __future__ import annotations


class LorcError(Exception):
    """A problem with the input or the options, worded for the user in one line.

    The CLI prints it as ``error: <message>`` and exits with status 2; anything else escaping
    ``convert`` is a bug.
    """
