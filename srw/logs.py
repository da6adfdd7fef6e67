"""Logging for every srw process: one format, the level and file from [log]."""
from __future__ import annotations

import logging
import sys

from srw.config import LogSettings


def setup(settings: LogSettings, process: str) -> None:
    """Log to [log] file (appended; lines from all processes interleave) or stderr."""
    if settings.file:
        handler: logging.Handler = logging.FileHandler(settings.file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    retag(process)


def retag(process: str) -> None:
    """A forked worker names itself in the lines it logs."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {process}[%(process)d] %(levelname)s %(message)s"))
