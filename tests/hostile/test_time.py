"""Scripts that never end: the wall and CPU limits stop them from outside."""
from __future__ import annotations

import time

LOOP = "while True:\n    pass\n"

CATCH_EVERYTHING = """
while True:
    try:
        while True:
            pass
    except BaseException:
        pass
"""

IGNORE_SIGNALS = """
import signal
for sig in (signal.SIGXCPU, signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
    signal.signal(sig, signal.SIG_IGN)
while True:
    pass
"""

SLEEP = "import time\ntime.sleep(60)\n"


def test_endless_loop(hostile):
    started = time.monotonic()
    hostile.expect("timeout", LOOP)
    assert time.monotonic() - started < 8


def test_loop_catching_base_exception(hostile):
    hostile.expect("timeout", CATCH_EVERYTHING)


def test_loop_ignoring_sigxcpu_and_sigterm(hostile):
    hostile.expect("timeout", IGNORE_SIGNALS)


def test_sleeping_past_the_wall_limit(hostile):
    started = time.monotonic()
    r = hostile.expect("timeout", SLEEP)
    assert "deadline" in r.error
    assert time.monotonic() - started < 8
