"""What every command line shares: one error convention (a ``LorcError`` or ``OSError`` becomes one
``error: ...`` line on stderr and exit status 2, the status argparse uses for a bad command line),
progress on stderr, the common end of the evaluation commands, and the options they share."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import LorcError
from ..evaluation.machine import to_json
from ..runtime.session import LORC_SETTINGS

EXIT_ERROR = 2


def fail(message: str) -> int:
    """Print ``error: message`` on stderr; the exit status of a failed command."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


def os_error_message(e: OSError) -> str:
    return f"{e.strerror or e}: {e.filename}" if e.filename else str(e)


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_csv(text: str | None, kind: Callable[[str], Any], what: str) -> list[Any]:
    """A comma-separated option (``what`` names it in the error); empty for None or blank."""
    if text is None or not text.strip():
        return []
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise LorcError(f"bad {what} list '{text}': {e}") from e


def run_cli(produce: Callable[[], dict[str, Any]], fmt: Callable[[dict[str, Any]], str], json_path: str | None,
            plot: Callable[[dict[str, Any], str], None] | None = None, plot_path: str | None = None) -> int:
    """The common end of the eval/bench/compare commands: run ``produce``, write the JSON (and the
    plot), print the table; a LorcError or OSError becomes one ``error:`` line and exit status 2."""
    try:
        report = produce()
        if json_path:
            Path(json_path).write_text(to_json(report) + "\n")
        if plot is not None and plot_path:
            plot(report, plot_path)
    except LorcError as e:
        return fail(str(e))
    except OSError as e:
        return fail(os_error_message(e))
    print(fmt(report))
    sys.stdout.flush()
    return 0


def add_settings_arguments(ap) -> None:
    """--lorc-sink-tokens / --lorc-recent-window / --lorc-attend-rest / --lorc-prefill-block of the eval and
    bench commands."""
    ap.add_argument("--lorc-sink-tokens", type=int, metavar="N",
                    help="run every LoRC model with exact K/V for its first N positions (default: each file's "
                         "lorc.sink_tokens; 0 together with --lorc-recent-window 0 = the plain latent cache)")
    ap.add_argument("--lorc-recent-window", type=int, metavar="N",
                    help="run every LoRC model with exact K/V for its last N positions (default: each file's "
                         "lorc.recent_window)")
    ap.add_argument("--lorc-attend-rest", type=int, choices=(0, 1), metavar="{0,1}",
                    help="with --lorc-top-k: attend the latent cells a decoded token does not rebuild at their "
                         "score's logits (1, the runtime's default) or leave them out (0) in every layer")
    ap.add_argument("--lorc-prefill-block", type=int, metavar="N",
                    help="with an exact window: attend a prompt ubatch in blocks of N queries (the runtime's "
                         "default 64; 0 = one block)")


def runtime_overrides(args) -> dict[str, int]:
    """The LoRC runtime settings a command line passed for every model (--lorc-sink-tokens,
    --lorc-recent-window, --lorc-attend-rest, --lorc-prefill-block): results measured under them are not the
    files' defaults."""
    # every runtime setting but the top-k, whose option takes a list of values (expand_top_k)
    return {name: getattr(args, name) for name in LORC_SETTINGS
            if name != "lorc_top_k" and getattr(args, name) is not None}


def parse_top_k(spec: str | None) -> list[int]:
    if not spec:
        return []
    try:
        values = [int(x) for x in spec.split(",")]
    except ValueError:
        raise LorcError(f"--lorc-top-k takes comma-separated integers, got '{spec}'") from None
    for v in values:
        if v < 0:
            raise LorcError(f"--lorc-top-k values must be >= 0, got {v}")
    return values


def parse_labels(spec: str | None, n: int) -> list[str | None]:
    if spec is None:
        return [None] * n
    labels = [x.strip() for x in spec.split(",")]
    if len(labels) != n:
        raise LorcError(f"--labels has {len(labels)} entries for {n} models")
    return labels
