"""Imports only go down: front-ends (srw, proxy, fs) > storage > broker > runtime > core.

Walks every module of the project (with ast, importing nothing) and fails on an
import of a higher layer, on any import circle (lazy imports inside functions
included in both), and on a choice of storage engine made outside the seam
(storage/engine.py and its two engines)."""
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


def module_files() -> dict[str, Path]:
    return {module: path for path, module in project_modules()}


def edges(path: Path, package: str, known: dict[str, Path]) -> set[str]:
    """The project modules this file imports: ``from pkg import mod`` names the
    module, ``from mod import name`` the module it names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in known:
                    out.add(target)
                elif base in known:
                    out.add(base)
                elif f"{base}.__init__" in known:
                    out.add(f"{base}.__init__")
    return out


def find_circle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of `graph` (module -> modules it imports), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return []


def test_no_import_circle():
    known = module_files()
    graph = {}
    for module, path in known.items():
        package = module.rsplit(".", 1)[0] if path.name == "__init__.py" else \
            (module.rsplit(".", 1)[0] if "." in module else "")
        graph[module] = edges(path, package, known) - {module}
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    circle = find_circle(graph)
    assert not circle, "an import circle: " + " -> ".join(circle)


# The seam: the choice between engines is made in these modules only.
SEAM = {"storage/engine.py", "storage/engine_lmdb.py", "storage/engine_redis.py",
        "storage/redis_store.py", "storage/router.py"}
# Modules that still choose for themselves, and why; each must still do so (the
# test fails when one stops: take it off the list).
CHOOSE_ON_THEIR_OWN = {
    "core/config.py": "below storage: it defines the choice and checks each engine's settings",
    "runtime/grantor.py": "below storage: a request's rights as a Redis login, not a capability",
}
ENGINE_NAMES = {"RedisStore", "RingRouter", "SlotRouter", "REDIS_CLUSTER", "LMDB",
                "LmdbEngine", "RedisEngine"}


def engine_choices(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of each place the code names an engine's own parts or asks
    which engine runs: ``cluster.redis``, ``cluster.engine`` in a comparison."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "redis" and \
                (isinstance(node.value, ast.Attribute) and node.value.attr == "cluster" or
                 isinstance(node.value, ast.Name) and node.value.id == "cluster"):
            out.append((node.lineno, "cluster.redis"))
        elif isinstance(node, ast.Compare) and any(
                isinstance(n, ast.Attribute) and n.attr == "engine" and
                isinstance(n.value, (ast.Attribute, ast.Name)) and
                getattr(n.value, "attr", getattr(n.value, "id", "")) == "cluster"
                for n in ast.walk(node)):
            out.append((node.lineno, "a comparison of cluster.engine"))
        elif isinstance(node, ast.Name) and node.id in ENGINE_NAMES:
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.alias) and node.name in ENGINE_NAMES:
            out.append((node.lineno, node.name))
    return out


def test_the_engine_is_chosen_behind_the_seam_only():
    assert sorted(engine_choices(ast.parse("if config.cluster.redis: RedisStore()\n"
                                           "x = cluster.engine == 'lmdb'\n"
                                           "y = 'storage' in self.engine.roles"))) == \
        [(1, "RedisStore"), (1, "cluster.redis"), (2, "a comparison of cluster.engine")]
    outside, stopped = [], []
    for path, _ in project_modules():
        where = str(path.relative_to(REPO))
        if where in SEAM:
            continue
        found = engine_choices(ast.parse(path.read_text(), where))
        if where in CHOOSE_ON_THEIR_OWN:
            stopped += [] if found else [where]
            continue
        outside += [f"{where}:{line}: {what}" for line, what in found]
    assert not outside, "engine choices outside storage/engine.py and its engines:\n" + \
        "\n".join(outside)
    assert not stopped, f"no longer choosing on their own (take off the list): {stopped}"
