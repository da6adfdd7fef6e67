"""Script names and compiled code.

A script name is a plain file name inside the history directory: no path
separators, no ``..``, no hidden files, no control characters.  The worker reads
named scripts and reads one again when its mtime or size changes (looked at
once per batch of requests it receives); compiled code is cached by whoever
runs it: by version for named scripts, by text for script content.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import linecache
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from types import CodeType

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,254}")


class ScriptNameError(ValueError):
    """The name is not a plain file name; the request is answered bad_request."""


class ScriptNotFound(LookupError):
    """No such script in the history directory; answered not_found."""


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or ".." in name:
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise ScriptNameError(
            f"bad script name {shown!r}: use a plain file name from the history directory "
            "(letters, digits, '_', '-', '.', '+'; no paths, no '..', no leading dot)")
    return name


@functools.lru_cache(maxsize=256)
def compile_content(code: str) -> CodeType:
    """Script content sent with a request; SyntaxError propagates to the caller."""
    return compile(code, "<script content>", "exec")


def compile_named(name: str, source: bytes, history_dir: str) -> CodeType:
    """A named script's code; SyntaxError propagates.  Tracebacks show its lines
    without reading the file again (the sandbox may not let them): the source
    goes into linecache, with mtime None so that linecache keeps it."""
    filename = os.path.join(history_dir, name)
    code = compile(source, filename, "exec")
    lines = source.decode("utf-8", "replace").splitlines(keepends=True)
    linecache.cache[filename] = (len(source), None, lines, filename)
    return code


@dataclass(frozen=True, slots=True)
class Script:
    """One version of a named script: `version` is unique within the worker;
    `sha256` names its bytes in a tenant (runtime/tenants.py)."""
    name: str
    version: int
    source: bytes
    sha256: bytes


class ScriptCache:
    """Named scripts of one history directory, read once per file version.

    `open_dir()` keeps a descriptor of the directory and files are opened
    relative to it.  The worker reads the sources and gives each version a
    number; whoever runs the script compiles it (the runner, or the worker
    itself in isolation "none", through `code`), so a script that does not
    compile never costs the worker anything.
    """

    def __init__(self, history_dir: str | Path):
        self.history_dir = str(history_dir)
        self.dir_fd: int | None = None
        self._cache: dict[str, tuple[int, int, Script]] = {}
        self._checked: set[str] = set()  # names looked up since new_batch()
        self._versions = itertools.count(1)
        self._code: dict[int, CodeType] = {}

    def open_dir(self) -> None:
        self.dir_fd = os.open(self.history_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _path(self, name: str):
        # per request: plain strings, no pathlib
        return name if self.dir_fd is not None else os.path.join(self.history_dir, name)

    def new_batch(self) -> None:
        """Requests that arrive from now on see the files as they are now: each
        name is looked up again once (a stat per batch, not per request)."""
        self._checked.clear()

    def get(self, name: str) -> Script:
        check_name(name)
        if name in self._checked:
            return self._cache[name][2]
        try:
            st = os.stat(self._path(name), dir_fd=self.dir_fd)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise ScriptNotFound(f"no script {name!r} in the history directory")
        cached = self._cache.get(name)
        if cached and cached[0] == st.st_mtime_ns and cached[1] == st.st_size:
            self._checked.add(name)
            return cached[2]
        fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dir_fd)
        with open(fd, "rb") as f:
            source = f.read()
        if cached:
            self._code.pop(cached[2].version, None)
        script = Script(name, next(self._versions), source, hashlib.sha256(source).digest())
        self._cache[name] = (st.st_mtime_ns, st.st_size, script)
        self._checked.add(name)
        return script

    def code(self, script: Script) -> CodeType:
        """The compiled script, for a worker that runs scripts itself."""
        code = self._code.get(script.version)
        if code is None:
            code = self._code[script.version] = compile_named(script.name, script.source,
                                                              self.history_dir)
        return code
