"""Script names and compiled code.

A script name is a plain file name inside the history directory: no path
separators, no ``..``, no hidden files, no control characters.  Compiled
named scripts are cached and recompiled when the file's mtime or size changes;
compiled script content (sent with the request) is cached by its text.
"""
from __future__ import annotations

import functools
import os
import re
import stat
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


class ScriptCache:
    """Named scripts of one history directory, compiled once per file version."""

    def __init__(self, history_dir: str | Path):
        self.history_dir = str(history_dir)
        self._cache: dict[str, tuple[int, int, CodeType]] = {}

    def get(self, name: str) -> CodeType:
        check_name(name)
        path = os.path.join(self.history_dir, name)  # per request: no pathlib
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise ScriptNotFound(f"no script {name!r} in the history directory")
        cached = self._cache.get(name)
        if cached and cached[0] == st.st_mtime_ns and cached[1] == st.st_size:
            return cached[2]
        with open(path, "rb") as f:
            source = f.read()
        code = compile(source, str(path), "exec")
        self._cache[name] = (st.st_mtime_ns, st.st_size, code)
        return code
