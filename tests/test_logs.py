"""core.logs in this process: the worker's exec line (HotLine) against logging's own."""
from __future__ import annotations

import logging
import os
import re
import signal
import time

import pytest

from core import logs
from core.config import LogSettings

EXEC = "exec %s %d B -> %d B %s %d us req %s"
ARGS = ("echo.py", 100, 104, "ok", 212.7, "0a1b")
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


@pytest.fixture
def worker_log(tmp_path):
    """This process logs as a worker does (buffered, to a file) for one test."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, signal.getsignal(signal.SIGUSR1), logs._path,
             logs._hot)
    path = tmp_path / "srw.log"
    logs.setup(LogSettings(level="info", file=str(path)), "pool n1")
    logs.retag("worker n1#1", buffered=True)
    yield path
    root.handlers[:] = [h for h in root.handlers if isinstance(h, logs.LineHandler)]
    for handler in root.handlers:
        handler.flush()
        if isinstance(handler, logs.LineHandler):
            handler.close()
            os.close(handler.fd)
    root.handlers[:], level, usr1, logs._path, logs._hot = saved
    root.setLevel(level)
    signal.signal(signal.SIGUSR1, usr1)


def alone() -> None:
    """Only the worker's handler on the root logger: pytest adds its own for
    each test's call (they would send HotLine through logging)."""
    logging.getLogger().handlers[:] = [logs._hot]


def test_a_hot_line_is_the_line_logging_writes_in_its_place(worker_log):
    alone()
    log = logging.getLogger("srw.worker")
    hot = logs.HotLine(log, EXEC)
    log.info(EXEC, *ARGS)
    hot(*ARGS)
    log.warning("then a warning")  # written at once, with what is buffered before it
    hot("<content>", 0, 0, "timeout", 5.0, "ff")
    assert worker_log.read_text().count("\n") == 3  # the last one still buffered
    logs.flush()
    lines = worker_log.read_text().splitlines()
    pid = os.getpid()
    body = f" worker n1#1[{pid}] INFO exec echo.py 100 B -> 104 B ok 212 us req 0a1b"
    assert [re.fullmatch(STAMP + re.escape(body), line) is not None for line in lines[:2]] \
        == [True, True], lines
    assert lines[2].endswith(f"worker n1#1[{pid}] WARNING then a warning")
    assert lines[3].endswith(" INFO exec <content> 0 B -> 0 B timeout 5 us req ff")


def test_a_hot_line_waits_at_most_buffer_seconds_for_the_next(worker_log, monkeypatch):
    alone()
    assert logs.BUFFER_SECONDS <= 0.1
    hot = logs.HotLine(logging.getLogger("srw.worker"), EXEC)
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    hot(*ARGS)
    now[0] += logs.BUFFER_SECONDS / 2
    hot(*ARGS)
    assert worker_log.read_text() == ""  # buffered: the process is busy
    now[0] = 1_000_000.0 + logs.BUFFER_SECONDS + 0.001
    hot(*ARGS)
    lines = worker_log.read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith(time.strftime("%Y-%m-%d %H:%M:%S,000",
                                                                 time.localtime(1_000_000)))


def test_a_bad_hot_line_is_shown_and_the_others_written(worker_log):
    alone()
    log = logging.getLogger("srw.worker")
    logs.HotLine(log, "exec %d")("not a number")
    logs.HotLine(log, EXEC)(*ARGS)
    logs.flush()
    first, second = worker_log.read_text().splitlines()
    assert first.endswith("INFO 'exec %d' % ('not a number',): bad arguments")
    assert second.endswith("req 0a1b")


def test_a_hot_line_goes_through_logging_when_another_handler_listens(worker_log):
    alone()
    seen = []
    extra = logging.Handler()
    extra.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger().addHandler(extra)  # python.init may, in isolation none
    try:
        logs.HotLine(logging.getLogger("srw.worker"), EXEC)(*ARGS)
    finally:
        logging.getLogger().removeHandler(extra)
    logs.flush()
    assert seen == ["exec echo.py 100 B -> 104 B ok 212 us req 0a1b"]
    assert worker_log.read_text().count("req 0a1b") == 1
    logging.getLogger().setLevel("WARNING")
    logs.HotLine(logging.getLogger("srw.worker"), EXEC)(*ARGS)
    logs.flush()
    assert worker_log.read_text().count("req 0a1b") == 1  # below the level: nothing


def test_reopen_in_the_middle_of_buffered_lines_loses_none(worker_log):
    """logrotate renames the file, then SIGUSR1: what was buffered and what
    follows go to the new file, each line once."""
    alone()
    hot = logs.HotLine(logging.getLogger("srw.worker"), EXEC)
    for i in range(10):
        hot("echo.py", i, i, "ok", 1, f"{i:x}")
    worker_log.rename(worker_log.with_suffix(".1"))
    signal.raise_signal(signal.SIGUSR1)
    for i in range(10, 20):
        hot("echo.py", i, i, "ok", 1, f"{i:x}")
    logs.flush()
    texts = worker_log.read_text() + worker_log.with_suffix(".1").read_text()
    assert sorted(int(line.rsplit(" ", 1)[1], 16) for line in texts.splitlines()) \
        == list(range(20))


def test_a_worker_busy_with_a_long_script_writes_the_lines_before_it(make_cluster):
    """The exec lines of requests that ended reach the file within BUFFER_SECONDS
    even while the worker waits on a long script (it writes them from its wait),
    not when that script ends."""
    from conftest import wait_until
    cluster = make_cluster(pool={"workers": 1})
    cluster.serve()
    marker = "exec echo.py 37 B -> 37 B ok"
    with cluster.client(timeout=20) as c:
        assert c.exec("echo.py", b"warm").ok
        # The first holds the worker, so the next two wait in its queue: the
        # worker goes from the quick one straight to the slow one, never idle.
        held = [c.submit("", code="import time; time.sleep(0.5)"),
                c.submit("echo.py", b"q" * 37),
                c.submit("", code="import time; time.sleep(4); __return_data = 'slow'")]
        assert c.result(*held[0]).ok and c.result(*held[1]).ok
        wait_until(lambda: marker in cluster.log(), 3, "the quick request's exec line")
        slow = c.result(*held[2])
        assert slow.data == b"slow"  # the line came while the slow one ran
