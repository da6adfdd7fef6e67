"""What every srw event loop sets up: ZeroMQ sockets with srw's options, and a
wake-up pipe for signals (handlers only record; the loop acts)."""
from __future__ import annotations

import os
import signal
from typing import Callable, Iterable

import zmq

QUEUE = 100_000  # messages queued per peer, each way (SNDHWM, RCVHWM)


def socket(ctx: zmq.Context, kind: int, max_message: int | None, *, secure=None,
           rcvhwm: int = QUEUE, **options: int) -> zmq.Socket:
    """A socket that lingers on nothing at close and drops a peer that sends a
    message larger than `max_message` (None: no limit).  `secure(sock)` makes
    it a CurveZMQ client or server (security.Credentials.apply,
    Keyring.secure); `options` are more ZMQ options by name (IMMEDIATE=1)."""
    sock = ctx.socket(kind)
    if secure is not None:
        secure(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, QUEUE)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message or -1)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    return sock


def bind(sock: zmq.Socket, endpoint: str) -> None:
    """Bind, replacing a socket file a killed process left; closes `sock` on failure."""
    try:
        if endpoint.startswith("ipc://"):
            path = endpoint[len("ipc://"):]
            if len(path) > 100:
                raise OSError(f"socket path too long for ipc (max 100 chars): {path}")
            if os.path.lexists(path):
                os.unlink(path)
        sock.bind(endpoint)
    except BaseException:
        sock.close()
        raise


def client_socket(ctx: zmq.Context, endpoint: str, max_message: int | None,
                  secure=None) -> zmq.Socket:
    """A DEALER to a node: reconnects fast, and queues only on a live connection
    (IMMEDIATE), so a request never waits in a pipe to a dead node and runs
    minutes later, after its caller gave up."""
    sock = socket(ctx, zmq.DEALER, max_message, secure=secure, RECONNECT_IVL=50,
                  RECONNECT_IVL_MAX=1000, IMMEDIATE=1)
    sock.connect(endpoint)
    return sock


def wake_on_signals(handler: Callable, signals: Iterable[int]) -> tuple[int, int]:
    """Install `handler` for `signals` and a wake-up pipe that each signal
    writes to (signal.set_wakeup_fd), so a loop polling the read end wakes
    at once.  Returns (read end, write end), both non-blocking."""
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)  # a flood: one wake is enough
    for sig in signals:
        signal.signal(sig, handler)
    return wake_r, wake_w
