"""Exit statuses of srw's processes, in one place: `srw serve` and the pool act
on a child's, and an operator reads them in the log.  Also how a wait status
reads in words: total functions, since the status may come from a process
that ran a script (any signal number, any exit code)."""
from __future__ import annotations

import os
import signal

FAILED = 1         # a command failed, or serve could not start its nodes (the reason is printed)
CONFIG = 2         # the config (or the command line) is wrong
REFUSED = 3        # a child refuses to start (python.init, profile, store): serve stops all
WORKER_BOOT = 4    # a worker could not start (its traceback is in the log)
NO_SANDBOX = 5     # a worker's zygote failed: no sandbox left to run scripts in
NO_BROKER = 6      # a worker's broker took no reply within SEND_TIMEOUT
WORKER_FAILED = 7  # a worker that was serving raised (its traceback is in the log)



class UsageError(ValueError):
    """What the caller asked for cannot be done (a size over a limit, a missing
    key, no serve running): a command prints its message as one line and exits
    FAILED.  Any other exception reaching the command line is a bug and keeps
    its traceback.  A ValueError, so callers that caught ValueError still do."""


MAX_WAIT_STATUS = 0xFFFF  # what waitpid can report; anything else is not a status


def process_alive(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's, alive
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2][1:2] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True


def signal_name(signum: int) -> str:
    """SIGKILL, SIGRTMIN+6, or "signal 99": never raises (signal.Signals does
    for real-time signals and numbers it does not know)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        pass
    if signal.SIGRTMIN < signum <= signal.SIGRTMAX:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
    return f"signal {signum}"


def describe(status: int) -> str:
    """A wait status in words ("killed by SIGSEGV", "exited with status 1",
    "stopped by SIGSTOP"), for any integer."""
    if not 0 <= status <= MAX_WAIT_STATUS:
        return f"ended with the impossible wait status {status}"
    if os.WIFSIGNALED(status):
        return f"killed by {signal_name(os.WTERMSIG(status))}"
    if os.WIFSTOPPED(status):
        return f"stopped by {signal_name(os.WSTOPSIG(status))}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status:#x}"
