"""Imports only go down: front-ends (srw, proxy, fs) > storage > broker > runtime > core.

Walks every module of the project (with ast, importing nothing) and fails on an
import of a higher layer, lazy imports inside functions included."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = {"core": 0, "runtime": 1, "broker": 2, "storage": 3,
          "proxy": 4, "fs": 4, "srw": 4, "libelliptics_python": 4}


def layer(module: str) -> int | None:
    return LAYERS.get(module.split(".")[0])


def imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .mod import y
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            out.append((node.lineno, base))
    return out


def project_modules() -> list[tuple[Path, str]]:
    files = [p for name in LAYERS for p in (REPO / name).rglob("*.py")]
    files.append(REPO / "libelliptics_python.py")
    return [(f, ".".join(f.relative_to(REPO).with_suffix("").parts)) for f in files]


def test_every_import_goes_down_or_sideways():
    upward = []
    for path, module in project_modules():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        own = layer(module)
        for line, target in imports(path, package):
            theirs = layer(target)
            if theirs is not None and theirs > own:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_core_imports_nothing_of_the_project_but_core():
    for path, module in project_modules():
        if layer(module) == 0:
            for line, target in imports(path, "core"):
                assert layer(target) in (None, 0), f"{path}:{line} imports {target}"


def test_the_executor_does_not_load_the_wire_protocol():
    """What runs next to scripts (runtime/executor.py) loads neither ZeroMQ nor
    the broker's wire messages nor msgpack: a script finds none of them loaded."""
    import subprocess
    import sys
    code = ("import sys, runtime.executor; "
            "print([m for m in ('zmq', 'core.protocol', 'msgpack') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert out.stdout.strip() == "[]", out.stderr
