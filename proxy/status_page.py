"""The status page: ``GET /status[?refresh=N][&format=json|html]``.

HTML for people, reloaded by the browser every `refresh` seconds (a meta
refresh: no script, and it keeps the query), or JSON with
``Accept: application/json`` or ``?format=json``.  Everything shown comes
from the nodes' brokers (broker/stats.py) and is escaped: script names
come from clients.
"""
from __future__ import annotations

import html
import json
import re
import time

from broker.stats import bucket_quantile, uptime_text
from core import __version__

DEFAULT_REFRESH = 5
MAX_REFRESH = 3600
STYLE = ("body{font-family:sans-serif;margin:1em 2em}table{border-collapse:collapse;"
         "margin:.3em 0 1em}td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}"
         "td.text,th.text{text-align:left}.down{color:#b00}")


def parse_refresh(raw: str | None) -> int:
    """Seconds between reloads, 0 for none; ValueError with the reason otherwise."""
    if raw is None:
        return DEFAULT_REFRESH
    if not raw.isdigit() or int(raw) > MAX_REFRESH:
        raise ValueError(f"bad refresh={raw[:20]!r}: give seconds between reloads, "
                         f"0 (none) to {MAX_REFRESH}")
    return int(raw)


def status_json(nodes: list[dict]) -> str:
    return json.dumps({"version": __version__, "nodes": nodes})


def status_html(nodes: list[dict], refresh: int) -> str:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    every = f"reloads every {refresh} s" if refresh else "does not reload (refresh=0)"
    body = [f"<h1>srw status</h1><p>srw {esc(__version__)} (proxy); page generated "
            f"{esc(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}, {every}.</p>"]
    body += [node_section(n) for n in nodes]
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\">" + meta +
            f"<title>srw status</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def node_section(n: dict) -> str:
    title = f"node {n['name']} (group {n['group']})"
    if "error" in n:
        return (f'<section class="node" data-node="{esc(n["name"])}"><h2>{esc(title)}</h2>'
                f'<p class="down">does not answer: {esc(n["error"])}</p></section>')
    window = n["latency_window"]
    causes = ", ".join(f"{c}: {k}" for c, k in sorted(n["restart_causes"].items())) or "none"
    summary = table(
        ("version", "uptime", "workers", "busy", "queued", "served", "restarts",
         "p50 µs", "p99 µs"),
        [[n["version"], uptime_text(n["uptime"]), n["workers"], n["busy"], n["queued"],
          n["served"], n["restarts"], n["latency_us"]["p50"], n["latency_us"]["p99"]]],
        "summary")
    return (f'<section class="node" data-node="{esc(n["name"])}"><h2>{esc(title)}</h2>'
            f"{summary}<p>p50 and p99: the last {window['ok_replies']} ok replies "
            f"(at most {window['limit']}); other statuses are counted, not timed. "
            f"Workers replaced, by cause: {esc(causes)}.</p>"
            f"{workers_table(n['worker_rows'])}{scripts_table(n)}</section>")


def workers_table(rows: list[dict]) -> str:
    head = ("slot", "pid", "state", "served", "held", "USS", "sandbox USS", "script")
    cells = [[r["slot"], r["pid"], r["state"], r["served"], r["held"], mib(r["uss"]),
              mib(r["sandbox_uss"]), r["script"]] for r in rows]
    attrs = [f' data-pid="{r["pid"]}"' for r in rows]
    return "<h3>Workers</h3>" + table(head, cells, "worker", attrs)


def scripts_table(n: dict) -> str:
    bounds = n["latency_buckets_us"]
    cells = []
    for script, s in sorted(n["scripts"].items()):
        others = ", ".join(f"{k} {v}" for k, v in sorted(s["statuses"].items()) if k != "ok")
        p50, p99 = (bucket_quantile(s["buckets"], bounds, q) for q in (0.5, 0.99))
        cells.append([script, sum(s["statuses"].values()), s["statuses"].get("ok", 0),
                      others, "" if p50 is None else p50, "" if p99 is None else p99])
    head = ("script", "execs", "ok", "other statuses", "p50 µs", "p99 µs")
    return ("<h3>Scripts since the broker started</h3><p>p50 and p99 estimated from "
            "latency buckets, ok replies.</p>" + table(head, cells, "script"))


def table(head, rows, kind: str, attrs: list[str] | None = None) -> str:
    """A table whose rows have class `kind`; text cells left, numbers right."""
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="{column(h)}{"" if number(v) else " text"}">{esc(v)}</td>'
                        for h, v in zip(head, row))
        out.append(f'<tr class="{kind}"{attrs[i] if attrs else ""}>{cells}</tr>')
    return "".join(out) + "</table>"


def column(head: str) -> str:
    """A cell's class from its column's heading: "sandbox USS" -> "sandbox-uss"."""
    return re.sub(r"[^a-z0-9]+", "-", head.lower().replace("µ", "u")).strip("-")


def number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def esc(v) -> str:
    return html.escape(str(v))


def mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"
