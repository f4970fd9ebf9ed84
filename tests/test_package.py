"""The package's shape: console scripts resolve, tools/ are shims over lorc_gguf.cli, and the
modules import each other without a cycle (checked statically, function-level imports included)."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = REPO_ROOT / "lorc_gguf"


def test_console_scripts_resolve() -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module.startswith("lorc_gguf.cli."), name
        assert callable(getattr(importlib.import_module(module), function)), name


def test_tools_call_the_cli() -> None:
    """Each tool is a shim over lorc_gguf.cli (results.py excepted: a script that runs the other
    tools from the checkout; gpu_check.py too: it starts on a lent machine's bare python3 and
    imports the package only from the bundle it carries)."""
    for tool in sorted((REPO_ROOT / "tools").glob("*.py")):
        if tool.stem in ("results", "gpu_check"):
            continue
        text = tool.read_text()
        assert "from lorc_gguf.cli." in text and "argparse" not in text, tool.name


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = ".".join(base[:len(base) - node.level + 1] + [node.module] if node.level and node.module
                              else base[:len(base) - node.level + 1] if node.level else [node.module or ""])
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            parts = c.split(".")
            # importing a submodule runs its packages' __init__ too (the root package's excepted:
            # every module is below it)
            for i in range(2, len(parts) + 1):
                q = ".".join(parts[:i])
                if q in modules and q != name and not name.startswith(q + "."):
                    found.add(q)
    return found


def test_no_import_cycles() -> None:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: _imports(p, m, set(paths)) for m, p in paths.items()}
    done: set[str] = set()

    def visit(m: str, stack: list[str]) -> None:
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        for d in sorted(graph[m]):
            visit(d, stack + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
