"""The control socket of `srw serve`: what `srw reload|resize|stop` talk to.

A unix stream socket ([serve] control; `serve --node NAME` adds ".NAME", so
several on one host do not collide), mode 0600 and checked by the peer's
uid (SO_PEERCRED: ours or root), so only the operator who started the node
reaches it; no script does (runners run as other uids).  One command a
connection, one line each way:

    reload                  -> "ok: node N: rolling to generation G; ..." every pool re-reads
                               config and python.init and rolls; when any refused:
                               "error: reload refused, old workers kept: node N: REASON; ..."
                               (the answer waits for every pool: core/timeouts.RELOAD_WAIT)
    resize N [NODE]         -> "ok: ..."     pools (or NODE's) to N workers
    stop                    -> "ok: ... pid" drain and stop, like SIGTERM
    sync                    -> "ok: NODES: sequence N, took NAMES|up to date[; refused ...]"
                                             the pushed scripts into the history dir now
                                             (srw/pushsync.py; python.init changed: reload)
    anything else           -> "error: ..."
"""
from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
from pathlib import Path
from typing import Callable

from core.config import Config

MAX_LINE = 256
READ_TIMEOUT = 1.0  # s a connected peer has to send its line
COMMANDS = "reload, resize N [NODE], stop, sync"


def socket_path(config: Config, node: str = "") -> str:
    """The control socket of a serve of every node, or of `serve --node NODE`; a
    path too long for a unix socket moves to /tmp under its hash."""
    path = config.serve.control + (f".{node}" if node else "")
    if len(path) <= 100:
        return path
    return f"/tmp/srw-{hashlib.sha1(path.encode()).hexdigest()[:20]}.ctl"


def socket_paths(config: Config) -> list[str]:
    """Every control socket a serve of this config may have bound, that exists."""
    candidates = [socket_path(config)] + [socket_path(config, n.name) for n in config.nodes]
    return [path for path in candidates if os.path.exists(path)]


class ControlUnavailable(Exception):
    """No srw serve answers on the control socket."""


class ControlServer:
    """Bound by the supervisor; `poll()` serves at most one waiting command."""

    def __init__(self, path: str, handle: Callable[[list[str]], str]):
        self.path, self.handle = path, handle
        self.sock = self._bind(path)

    @staticmethod
    def _bind(path: str) -> socket.socket:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if os.path.exists(path):
            if _answers(path):
                raise ControlUnavailable(f"{path} belongs to another srw serve that is "
                                         "running; stop it, or give this one its own "
                                         "[serve] control")
            os.unlink(path)  # left by a serve that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(8)
        sock.setblocking(False)
        return sock

    def poll(self, timeout: float) -> None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(READ_TIMEOUT)
            try:
                reply = self._answer(conn)
                conn.sendall(reply.encode() + b"\n")
            except OSError:
                pass  # the peer left or sent nothing in time: nothing to answer

    def _answer(self, conn: socket.socket) -> str:
        uid = _peer_uid(conn)
        if uid not in (0, os.geteuid()):
            return f"error: uid {uid} may not control this node"
        line = b""
        while b"\n" not in line and len(line) <= MAX_LINE:
            chunk = conn.recv(MAX_LINE)
            if not chunk:
                break
            line += chunk
        words = line.split(b"\n")[0].decode("utf-8", "replace").split()
        if not words:
            return f"error: empty command; commands: {COMMANDS}"
        return self.handle(words)

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def send(path: str, command: str, timeout: float = 5.0) -> str:
    """Send one command; returns the reply line ("ok: ..." or "error: ...")."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlUnavailable(f"no srw serve answers on {path}; is it running with "
                                     "this config?") from None
        except PermissionError:
            raise ControlUnavailable(f"{path}: permission denied; run this as the user "
                                     "that started srw serve") from None
        sock.sendall(command.encode() + b"\n")
        reply = b""
        try:
            while not reply.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except socket.timeout:
            raise ControlUnavailable(f"srw serve on {path} did not answer within "
                                     f"{timeout:g} s") from None
    return reply.decode("utf-8", "replace").strip() or "error: no answer"
