"""Exit statuses of srw's processes, in one place: `srw serve` and the pool act
on a child's, and an operator reads them in the log."""

FAILED = 1         # a command failed, or serve could not start its nodes (the reason is printed)
CONFIG = 2         # the config (or the command line) is wrong
REFUSED = 3        # a child refuses to start (python.init, profile, store): serve stops all
WORKER_BOOT = 4    # a worker could not start (its traceback is in the log)
NO_SANDBOX = 5     # a worker's zygote failed: no sandbox left to run scripts in
NO_BROKER = 6      # a worker's broker took no reply within SEND_TIMEOUT
