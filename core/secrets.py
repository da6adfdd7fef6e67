"""Secret files: written once with mode 0600, read with a message that says what to do.

The push secret (srw/pushed.py) and the Redis passwords (core/redis_auth.py)
are such files; CurveZMQ key pairs are pyzmq's certificates (core/security.py).
"""
from __future__ import annotations

import os
from pathlib import Path

MIN_LENGTH = 32  # characters: the files srw writes hold 64 hex digits


def write_secret(path: str | Path, text: str | None = None) -> Path:
    """`text` (default: 32 random bytes, hex) in a new file of mode 0600; refuses
    to overwrite one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text if text is not None else os.urandom(32).hex() + "\n")
    return path


def read_secret(path: str | Path, what: str, remedy: str, error: type[Exception]) -> str:
    """The secret in `path`, stripped; `error` naming `what` and `remedy` when the
    file is missing or too short to be one srw wrote."""
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise error(f"no {what} at {path} ({exc.strerror}): {remedy}") from None
    if len(secret) < MIN_LENGTH:
        raise error(f"{path}: a {what} needs at least {MIN_LENGTH} characters")
    return secret
