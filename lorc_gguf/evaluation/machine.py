"""Machine and version information stored with every result, and the JSON they are written as."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, Any]:
    try:
        import llama_cpp

        backend = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except Exception:  # pragma: no cover - llama_cpp missing
        backend = None
    try:
        load = list(os.getloadavg())
    except OSError:  # pragma: no cover
        load = None
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads, "backend": backend,
            "platform": platform.platform(), "loadavg": load}


def versions() -> dict[str, Any]:
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("lorc-gguf", "llama_cpp_python", "gguf", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        from ..runtime import patched as runtime

        out["lorc_runtime_format"] = runtime.runtime_format_version()
    except Exception:  # pragma: no cover
        out["lorc_runtime_format"] = None
    return out


def to_json(report: dict[str, Any]) -> str:
    import json

    return json.dumps(report, indent=2, default=lambda o: str(o) if isinstance(o, Path) else asdict(o))
