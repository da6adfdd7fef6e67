"""What one request leaves behind never reaches the next."""
from __future__ import annotations

from conftest import wait_until

PLANT = """
import builtins, json, sys
builtins.planted = "left behind"
json.planted = "left behind"
sys.modules["planted"] = json
global_planted = "left behind"
"""

LOOK = """
import builtins, json, sys
__return_data = repr((hasattr(builtins, "planted"), hasattr(json, "planted"),
                      "planted" in sys.modules, "global_planted" in globals()))
"""

THREAD = """
import os, threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
__return_data = str(os.getpid())
"""

COUNT_THREADS = "import threading\n__return_data = str(threading.active_count())\n"


def test_module_and_builtin_state(hostile):
    hostile.expect("ok", PLANT)
    looks = {hostile.run(LOOK).data for _ in range(4)}  # both workers
    if hostile.fork:  # anything at all: each request has its own process
        assert looks == {b"(False, False, False, False)"}
    else:  # copy: rebinding globals never leaks; modules are shared by design
        assert all(look.endswith(b"False)") for look in looks)


def test_thread_left_running(hostile):
    pid = int(hostile.expect("ok", THREAD).data)
    # the runner that ran it is replaced once the reply is out (copy); in fork
    # isolation every runner is, after every request
    wait_until(lambda: pid not in {r.pid for r in hostile.cluster.runners()}, 10,
               "the runner that ran the thread replaced")
    hostile.assert_recovered()
    assert {hostile.run(COUNT_THREADS).data for _ in range(4)} == {b"1"}


FORK_AND_RETURN = """
import os
os.fork()  # both copies finish the script: only the real one may answer
__return_data = "once"
"""

IGNORE_SIGTERM = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"


def test_forked_copy_returning_from_the_script(hostile):
    r = hostile.expect("ok", FORK_AND_RETURN)
    assert r.data == b"once"


def test_signal_handlers_changed_by_a_script(hostile):
    hostile.expect("ok", IGNORE_SIGTERM)
    pool = hostile.cluster.processes("srw: pool n1")[0]
    before = {w.pid for w in hostile.cluster.workers()}
    pool.send_signal(1)  # SIGHUP: reload python.init and recycle every worker with SIGTERM
    wait_until(lambda: not before & {w.pid for w in hostile.cluster.workers()}, 15,
               "every worker recycled (none ignores SIGTERM)")
    hostile.assert_recovered()
