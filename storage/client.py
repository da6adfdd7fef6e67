"""``Session``: the cluster as one client.

Routes by ``id`` (hex) or ``key`` (sha512) with the Ring: exec runs on the
owner of the id in each requested group, or on every node of every group when
no id is given, and returns one Result per node in route order.  A node that
does not answer gives a Result with status ``unavailable``; transport
failures of the whole call raise.
"""
from __future__ import annotations

from pathlib import Path

from broker import protocol as p
from broker.client import BrokerUnavailable, Client, Result, gather
from srw import config as cfg

from .ring import Ring, id_hex, key_id, parse_id

__all__ = ["Session", "Result"]


class Session:
    def __init__(self, config: str | Path | cfg.Config = "config.toml",
                 timeout: float | None = None):
        self.config = config if isinstance(config, cfg.Config) else cfg.load(config)
        self.ring = Ring(self.config)
        self.timeout = timeout
        self._brokers: dict[str, Client] = {}

    def _broker(self, name: str) -> Client:
        client = self._brokers.get(name)
        if client is None:
            client = Client(self.config.node(name).broker, timeout=self.timeout)
            self._brokers[name] = client
        return client

    def route(self, id: str | None = None, key: str | bytes | None = None,
              groups: list[int] | None = None):
        """The nodes a request goes to, in route order."""
        if id is not None and key is not None:
            raise ValueError("give id or key, not both")
        value = parse_id(id) if id is not None else key_id(key) if key is not None else None
        return self.ring.targets(value, groups)

    def exec(self, name: str = "", data: bytes = b"", code: str = "", id: str | None = None,
             key: str | bytes | None = None, groups: list[int] | None = None,
             cookie: str = "", timeout: float | None = None) -> list[Result]:
        targets = self.route(id, key, groups)
        hex_id = id if id is not None else (None if key is None else id_hex(key_id(key)))
        calls = []
        for node in targets:
            client = self._broker(node.name)
            rid, wait = client.submit(name, data, code, timeout, cookie, hex_id)
            calls.append((client, rid, wait))
        results = []
        for node, answer in zip(targets, gather(calls)):
            if isinstance(answer, BrokerUnavailable):
                answer = Result(node.name, node.group, p.UNAVAILABLE, b"", str(answer))
            results.append(answer)
        return results

    def status(self) -> list[dict]:
        """Every node's pool status; an unreachable node shows as {"name", "error"}."""
        out = []
        for node in self.config.nodes:
            try:
                out.append(self._broker(node.name).status(timeout=2.0))
            except BrokerUnavailable as exc:
                out.append({"name": node.name, "group": node.group, "error": str(exc)})
        return out

    def close(self) -> None:
        for client in self._brokers.values():
            client.close()
        self._brokers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
