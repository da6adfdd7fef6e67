"""The worker's exec line, alone: CPU per line through `logger.info` and
through `core.logs.HotLine`, set up as in a worker (buffered, to a file).

    python bench/log_bench.py [--lines 50000] [--rounds 7] [--profile]

Each way logs the same line (`exec echo.py 100 B -> 104 B ok 212 us req ...`)
`--lines` times, then flushes, so formatting and the write are counted; the
two ways take turns and each shows its best round, in process CPU time (the
figure the machine's other load disturbs least).  With --profile, cProfile's
top entries for each way.  Figures only; nothing here is a pass/fail test.
"""
from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core import logs  # noqa: E402
from core.config import LogSettings  # noqa: E402

EXEC = "exec %s %d B -> %d B %s %d us req %s"
JOB = b"0123456789abcdef"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    log = logging.getLogger("srw.worker")
    hot = logs.HotLine(log, EXEC)

    def through_logging() -> None:
        for _ in range(args.lines):
            log.info(EXEC, "echo.py", 100, 104, "ok", 212.7, JOB.decode("ascii", "replace"))

    def through_hot_line() -> None:
        for _ in range(args.lines):
            hot("echo.py", 100, 104, "ok", 212.7, JOB.decode("ascii", "replace"))

    ways = {"logger.info": through_logging, "HotLine": through_hot_line}
    with tempfile.TemporaryDirectory(prefix="srw-log-bench-") as tmp:
        path = Path(tmp) / "srw.log"
        logs.setup(LogSettings(level="info", file=str(path)), "pool bench")
        logs.retag("worker bench#1", buffered=True)
        best = dict.fromkeys(ways, float("inf"))
        for _ in range(args.rounds):
            for name, way in ways.items():
                started = time.process_time()
                way()
                logs.flush()
                best[name] = min(best[name], time.process_time() - started)
        lines = path.read_text().splitlines()
        assert len(lines) == args.rounds * len(ways) * args.lines, len(lines)
        print(f"{args.lines} lines x {args.rounds} rounds, to a file; "
              "CPU per line, best round, flush and write included:")
        for name, seconds in best.items():
            print(f"  {name:12} {seconds / args.lines * 1e6:6.2f} us")
        print(f"  HotLine / logger.info = {best['HotLine'] / best['logger.info']:.2f}")
        if args.profile:
            for name, way in ways.items():
                print(f"\ncProfile, {name}:")
                profile = cProfile.Profile()
                profile.runcall(way)
                logs.flush()
                pstats.Stats(profile).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()
