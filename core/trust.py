"""Who may talk on a broker's back socket: the pool's own workers, nobody else.

Two locks, both the broker's, made fresh at every start:

* the socket file (``workers_endpoint``) is created under umask 077 and
  chmod 0600: only the broker's uid can connect to it;
* beside it, ``<socket path>.token`` holds a random token (TOKEN_BYTES,
  mode 0600).  A worker reads it each time it registers (`read_worker_token`)
  and sends it in READY; the broker compares it in constant time and ignores
  a READY without it.  A restarted broker has a new token, so a worker of
  the old one registers again with the new one.

The broker removes both files when it stops (`remove_worker_files`), and a
stale pair left by a killed broker before it binds.
"""
from __future__ import annotations

import hmac
import os
import secrets
import stat

from core import loop

TOKEN_BYTES = 32
TOKEN_SUFFIX = ".token"


class TokenUnavailable(OSError):
    """The worker token cannot be read: no broker runs there, or we may not read it."""


def socket_path(endpoint: str) -> str:
    """The file of an ``ipc://`` endpoint (the only kind a back socket is)."""
    if not endpoint.startswith("ipc://"):
        raise ValueError(f"a workers endpoint must be ipc://, not {endpoint!r}")
    return endpoint[len("ipc://"):]


def token_path(endpoint: str) -> str:
    """Where the broker of `endpoint` keeps its worker token."""
    return socket_path(endpoint) + TOKEN_SUFFIX


def read_worker_token(endpoint: str) -> bytes:
    """The token of the broker on `endpoint`, for a worker's READY.

    Raises TokenUnavailable, naming the file, when it is missing (the broker
    is not running, or not yet), unreadable (only the broker's uid may read
    it), not a regular file of our own uid, or not a token."""
    path = token_path(endpoint)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TokenUnavailable(f"no worker token at {path}: is the node's broker running "
                               "(srw serve, srw broker --node NAME)?") from None
    except OSError as exc:
        raise TokenUnavailable(f"cannot read the worker token {path}: {exc.strerror}; "
                               "only the broker's uid may") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise TokenUnavailable(f"{path} is not a regular file of uid {os.geteuid()}: "
                                   "not a token this broker wrote")
        token = os.read(fd, TOKEN_BYTES + 1)
    finally:
        os.close(fd)
    if len(token) != TOKEN_BYTES:
        raise TokenUnavailable(f"{path} holds {len(token)} bytes, not a {TOKEN_BYTES}-byte "
                               "token (written half by a broker that died?)")
    return token


def write_worker_token(endpoint: str) -> bytes:
    """Broker side, at start: a fresh token in a new file only our uid can read.

    Any old file is unlinked first, and the new one is created exclusively
    without following links, so nobody can hold it open from before or point
    it elsewhere."""
    path = token_path(endpoint)
    token = secrets.token_bytes(TOKEN_BYTES)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        view = memoryview(token)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return token


def bind_workers_socket(sock, endpoint: str) -> bytes:
    """Broker side, at start: a fresh token beside `endpoint` first (a worker
    that can connect finds it), then `sock` bound there so that only our uid
    may connect.  Returns the token."""
    token = write_worker_token(endpoint)
    mask = os.umask(0o077)
    try:
        loop.bind(sock, endpoint)
    finally:
        os.umask(mask)
    os.chmod(socket_path(endpoint), 0o600)
    return token


def token_matches(expected: bytes, given: bytes) -> bool:
    """Constant-time comparison; an empty expected token matches nothing."""
    return bool(expected) and hmac.compare_digest(expected, given)


def remove_worker_files(endpoint: str, token: bytes) -> None:
    """Broker side, when it stops: the socket file and the token, if the token
    is still `token` (a broker started since has written its own first)."""
    try:
        if not token_matches(token, read_worker_token(endpoint)):
            return
    except TokenUnavailable:
        return
    for path in (socket_path(endpoint), token_path(endpoint)):  # the token says whose: last
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
