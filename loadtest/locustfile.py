"""Locust users for srw: exec over ZeroMQ (the project's client) and over HTTP.

    locust -f loadtest/locustfile.py --config-file loadtest/srw.conf   (see README)

Scenarios are tasks tagged by name; pick them with ``--tags``:
    trivial   echo.py with a 32-byte body
    payload   echo.py with a 10 kB body
    store     store_rw.py: read a key through the store handle, write it back
    cpu       cpu_5ms.py: about 5 ms of Python arithmetic
With no --tags every task runs, weighted as a mix (mostly trivial).

Settings come from the environment:
    SRW_CONFIG   config file whose first node the ZeroMQ user targets (config.toml)
    SRW_BROKER   broker endpoint, instead of reading SRW_CONFIG
    SRW_FAILURES_FILE  where to write the final failures as JSON at the end
Every non-ok result is reported to locust as a failure named by its status.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import zmq.green
from locust import FastHttpUser, TaskSet, User, between, events, tag, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from broker.client import BrokerUnavailable, Client  # noqa: E402
from core import config as cfg  # noqa: E402

TRIVIAL = b"t" * 32
PAYLOAD = os.urandom(5 * 1024).hex().encode()  # 10 kB of printable bytes


class ScriptFailed(Exception):
    """A result whose status is not ok; locust groups failures by this text."""


def broker_endpoint() -> str:
    if os.environ.get("SRW_BROKER"):
        return os.environ["SRW_BROKER"]
    return cfg.load(os.environ.get("SRW_CONFIG", "config.toml")).nodes[0].broker


class Scenarios(TaskSet):
    """The tasks both users share; the user's `call(name, script, data)` is the transport."""

    def call(self, *args, **kw):
        self.user.call(*args, **kw)

    @tag("trivial")
    @task(10)
    def trivial(self):
        self.call("trivial", "echo.py", TRIVIAL, expect=TRIVIAL)

    @tag("payload")
    @task(2)
    def payload(self):
        self.call("payload 10kB", "echo.py", PAYLOAD, expect=PAYLOAD)

    @tag("store")
    @task(2)
    def store(self):
        key = b"locust-%d" % (id(self.user) % 64)
        self.call("store read+write", "store_rw.py", key)

    @tag("cpu")
    @task(1)
    def cpu(self):
        self.call("cpu 5ms", "cpu_5ms.py", b"")


class ZmqUser(User):
    """Exec through broker.client.Client on a gevent-friendly ZeroMQ context."""
    tasks = [Scenarios]
    wait_time = between(0, 0)

    def on_start(self):
        self.client = Client(broker_endpoint(), timeout=10.0, ctx=zmq.green.Context.instance())

    def on_stop(self):
        self.client.close()

    def call(self, name: str, script: str, data: bytes, expect: bytes | None = None):
        start = time.perf_counter()
        exception, length = None, 0
        try:
            result = self.client.exec(script, data)
            length = len(result.data)
            if not result.ok:
                exception = ScriptFailed(f"{result.status}: {(result.error or '')[:200]}")
            elif expect is not None and result.data != expect:
                exception = ScriptFailed("wrong reply data")
        except BrokerUnavailable as exc:
            exception = exc
        events.request.fire(request_type="zmq", name=name, context={},
                            response_time=(time.perf_counter() - start) * 1000,
                            response_length=length, exception=exception, response=None)


class HttpUser(FastHttpUser):
    """Exec through the HTTP proxy: POST /elliptics?exec&name=SCRIPT."""
    tasks = [Scenarios]
    wait_time = between(0, 0)
    host = "http://127.0.0.1:9000"

    def call(self, name: str, script: str, data: bytes, expect: bytes | None = None):
        with self.client.post(f"/elliptics?exec&name={script}", data=data, name=name,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif expect is not None and response.content != expect:
                response.failure("wrong reply data")


@events.quit.add_listener
def save_failures(**kw):
    """The final failures, for loadtest/run.py: the CSV is a periodic snapshot."""
    path = os.environ.get("SRW_FAILURES_FILE")
    runner = getattr(save_failures, "environment", None) and save_failures.environment.runner
    if path and runner is not None:
        Path(path).write_text(json.dumps(list(runner.stats.serialize_errors().values())))


@events.init.add_listener
def remember_environment(environment, **kw):
    save_failures.environment = environment
