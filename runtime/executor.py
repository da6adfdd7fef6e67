"""Run one exec request in a fresh copy of the global context.

The contract (DESIGN.md "The script's world"): the copy gets
``__input_binary_data_tuple`` = (data,), ``__cookie_string`` and
``__return_data`` (as python.init left it, else ""); the script content runs
first, then the named script, in that one context; ``__return_data`` is the
reply (str -> UTF-8, bytes as is).  Nothing a script rebinds reaches the next
request, because each request starts from a new dict.
"""
from __future__ import annotations

import traceback
from types import CodeType
from typing import Callable

from core import statuses

from .scripts import compile_content, compile_named


class Executor:
    def __init__(self, global_context: dict, output_bytes: int):
        self.template = global_context
        self.template.setdefault("__return_data", "")
        self.output_bytes = output_bytes

    def run(self, named: Callable[[], CodeType] | None, code: str, data: bytes,
            cookie: str) -> tuple[str, bytes, str]:
        """Compile what the request names (`named` compiles the named script),
        then execute it; returns (status, data, error) and never raises for
        anything a script or its source does."""
        try:
            named_code = named() if named is not None else None
            content = compile_content(code) if code else None
        except MemoryError:
            return (statuses.MEMORY, b"",
                    "compiling the script ran out of memory (sandbox memory_mb limit)")
        except Exception as exc:  # SyntaxError, null bytes, nesting too deep
            return (statuses.SCRIPT_ERROR, b"",
                    "".join(traceback.format_exception_only(exc)).rstrip())
        return self.execute(named_code, content, data, cookie)

    def execute(self, named: CodeType | None, content: CodeType | None, data: bytes,
                cookie: str) -> tuple[str, bytes, str]:
        """Run compiled code in a fresh copy of the global context."""
        context = dict(self.template)
        context["__input_binary_data_tuple"] = (data,)
        context["__cookie_string"] = cookie
        try:
            if content is not None:
                exec(content, context)
            if named is not None:
                exec(named, context)
        except MemoryError:
            return statuses.MEMORY, b"", "the script ran out of memory (sandbox memory_mb limit)"
        except RecursionError as exc:
            return statuses.SCRIPT_ERROR, b"", _format(exc, skip=1, limit=20)
        except statuses.Unavailable as exc:  # the store, not the script, failed: callers may retry
            return statuses.UNAVAILABLE, b"", _one_line(exc)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the worker stays up
            return statuses.SCRIPT_ERROR, b"", _format(exc, skip=1)
        try:
            return self._output(context.get("__return_data"))
        except MemoryError:
            return statuses.MEMORY, b"", "out of memory while encoding __return_data (memory_mb)"

    def warm_up(self) -> None:
        """Run an empty request once, compiling as a request does: a fresh fork
        pays its first page faults here, ahead of time, instead of on the first
        real request."""
        self.run(lambda: compile_named("warm-up", b"__return_data = b''", "/"),
                 "__return_data = ''", b"", "")

    def _output(self, value) -> tuple[str, bytes, str]:
        if isinstance(value, str):
            # Checked before encoding so a huge str is refused without a copy.
            if len(value) > self.output_bytes:
                return self._too_large(len(value))
            value = value.encode("utf-8", "surrogateescape")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value)
        else:
            return (statuses.SCRIPT_ERROR, b"",
                    f"__return_data must be str or bytes, not {type(value).__name__}")
        if len(value) > self.output_bytes:
            return self._too_large(len(value))
        return statuses.OK, value, ""

    def _too_large(self, size: int) -> tuple[str, bytes, str]:
        return (statuses.OUTPUT_TOO_LARGE, b"",
                f"__return_data is {size} bytes; the sandbox profile allows "
                f"{self.output_bytes} (output_bytes)")


def _one_line(exc: BaseException, limit: int = 500) -> str:
    """An unavailable store as one line (its type and message): the cause is the
    cluster's, and a traceback through the handle helps no caller."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text[:limit]


def _format(exc: BaseException, skip: int, limit: int | None = None) -> str:
    """The script's own traceback: the first `skip` frames are ours, not the script's."""
    tb = exc.__traceback__
    for _ in range(skip):
        if tb is not None:
            tb = tb.tb_next
    lines = traceback.format_exception(type(exc), exc, tb, limit=limit)
    return "".join(lines).rstrip()
