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
import threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
__return_data = "started"
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
    pids = {w.pid for w in hostile.cluster.workers()}
    hostile.expect("ok", THREAD)
    if not hostile.fork:  # the worker that ran it is recycled once the reply is out
        wait_until(lambda: len(pids & {w.pid for w in hostile.cluster.workers()}) == 1, 10,
                   "the worker that ran the thread replaced")
    hostile.assert_recovered()
    assert {hostile.run(COUNT_THREADS).data for _ in range(4)} == {b"1"}
