"""How a runner ends is hostile input to its worker: every signal number, a
stop, a reply written by an orphan after its runner was reaped.  Each case
ends that runner, never the worker."""
from __future__ import annotations

import signal

# Signals whose default action does nothing, and those Python ignores or handles.
HARMLESS = {signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH,
            signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTTIN, signal.SIGTTOU}
STOPS = {signal.SIGSTOP, signal.SIGTSTP}

SELF_SIGNAL = "import os\nos.kill(os.getpid(), %d)\n__return_data = 'alive'\n"

# The runner's serve loop holds the request (its random sequence number) and the
# reply pipe: a child forked by the script answers for it after the runner has
# exited and been reaped, so the worker reads a valid reply from a process that
# is gone (its /proc entry with it).
LATE_ORPHAN = """
import os, sys, time
frame = sys._getframe()
while frame is not None and "res_w" not in frame.f_locals:
    frame = frame.f_back
res_w, seq = frame.f_locals["res_w"], frame.f_locals["request"].seq
channel = sys.modules["runtime.channel"]
runner = os.getpid()
if os.fork() == 0:
    for _ in range(400):  # until the zygote has reaped the runner
        if not os.path.exists("/proc/%d" % runner):
            break
        time.sleep(0.005)
    channel.write_reply(res_w, seq, "ok", 0, "", b"from beyond")
    time.sleep(0.5)
    os._exit(0)
os._exit(0)
"""


def worker_pids(hostile) -> set[int]:
    return {w.pid for w in hostile.cluster.workers()}


def test_every_signal_a_runner_sends_itself(hostile):
    """os.kill(os.getpid(), N) for N in 1..64: the worker formats the death of
    any signal (real-time ones included) and stays; a stopped runner is killed
    at the request's deadline and answered timeout."""
    before = worker_pids(hostile)
    for signum in range(1, 65):
        r = hostile.run(SELF_SIGNAL % signum, timeout=0.5)
        if signum in STOPS:
            assert r.status == "timeout", (signum, r.status, r.error)
        elif signum in HARMLESS:
            assert (r.status, r.data) == ("ok", b"alive"), (signum, r.status, r.error)
        elif r.status == "killed":
            assert "killed by SIG" in r.error or f"killed by signal {signum}" in r.error, \
                (signum, r.error)
        elif signum == signal.SIGXCPU and hostile.fork:  # RLIMIT_CPU's signal there
            assert r.status == "timeout", (signum, r.status, r.error)
        else:  # ignored or handled in the runner (SIGINT, SIGTERM, SIGUSR1 ...)
            assert r.status in ("ok", "script_error"), (signum, r.status, r.error)
        assert signum not in (signal.SIGKILL, signal.SIGSEGV, 40, 64) or r.status == "killed"
        assert worker_pids(hostile) == before, f"a worker died after signal {signum}"
    hostile.assert_recovered()
    assert worker_pids(hostile) == before


def test_a_reply_from_an_orphan_after_its_runner_is_reaped(hostile):
    before = worker_pids(hostile)
    for _ in range(3):
        r = hostile.run(LATE_ORPHAN, timeout=2.0)
        assert r.status in ("killed", "ok"), (r.status, r.error)
        assert worker_pids(hostile) == before
    hostile.assert_recovered()
    assert worker_pids(hostile) == before
