"""The timeouts that must stay ordered, in one place (seconds).

Each pair below is an order a part of srw relies on; the check runs when this
module loads, so a change that breaks one fails at once, with the reason.
The one taken from the config is the request timeout (`broker_drain`,
`client_wait`).
"""
from __future__ import annotations

from core.config import Config

STOP_LINGER = 0.25     # broker, storage: stay connected after the last replies, so they leave
RELAY_GRACE = 1.0      # a storage relay answers an exec this long past its deadline...
CLIENT_GRACE = 2.0     # ...before the client itself gives up, this long past it
CLIENT_DEFAULT_WAIT = 60.0  # a client that knows no request timeout and cannot learn it
INDEX_GRACE = 2.0      # an indexed write waits for its indexing exec's relay
WORKER_BACKSTOP = 2.0  # copy, fork: the pool kills a worker only this long past its deadline
PROXY_SHUTDOWN = 3.0   # the proxy's requests in flight at SIGTERM
STORAGE_STOP = 3.0     # storage: relayed replies awaited when stopping
POOL_STOP = 5.0        # pool: workers awaited after they were told to go, then SIGKILL
SERVE_PROXY_WAIT = 5.0  # srw serve: the proxy's stop, then SIGKILL
SERVE_STOP_WAIT = 8.0   # srw serve: pools' and storage's stop, then SIGKILL
RELOAD_WAIT = 30.0      # srw serve: each pool's answer to a reload (python.init runs again)...
RELOAD_CLIENT_WAIT = 35.0  # ...before `srw reload` stops waiting for serve's reply

ORDER = [
    (RELAY_GRACE, CLIENT_GRACE, "a storage relay answers for its broker before the client "
                                "stops waiting"),
    (RELAY_GRACE, INDEX_GRACE, "an indexed write outwaits its indexing exec's relay"),
    (PROXY_SHUTDOWN, SERVE_PROXY_WAIT, "serve lets the proxy finish before it kills it"),
    (POOL_STOP, SERVE_STOP_WAIT, "serve lets a pool reap its workers before it kills it"),
    (STORAGE_STOP, SERVE_STOP_WAIT, "serve lets storage send its last replies"),
    (STOP_LINGER, STORAGE_STOP, "the linger fits in storage's stop"),
    (RELOAD_WAIT, RELOAD_CLIENT_WAIT, "srw reload hears serve say which pool refused"),
]


def broker_drain(config: Config) -> float:
    """How long serve waits for a broker to answer what is in flight: a request
    may run request_timeout, and its reply then still has to leave."""
    return config.broker.request_timeout + CLIENT_GRACE


def client_wait(timeout: float) -> float:
    """How long a client waits for an exec's reply: the node may work `timeout`
    (the request's, else the node's request_timeout, which Session and the CLI
    send from their config and a bare Client asks the broker's status for),
    then its relay answers within RELAY_GRACE."""
    return timeout + CLIENT_GRACE


def check() -> None:
    for shorter, longer, why in ORDER:
        if not shorter < longer:
            raise RuntimeError(f"core/timeouts.py: {shorter} s must be below {longer} s: {why}")


check()
