"""The core: what every other part of srw builds on, importing nothing of srw.

    config    the config file, checked at load (defined once)
    logs      log setup, reopen on USR1, Throttle
    sched     CPU pinning and load-adaptive scheduling
    security  CurveZMQ keys, ZAP, rights
    protocol  the wire messages between clients, brokers and workers (defined once)
    statuses  the status vocabulary and Result
    ids       ids and keys: the one parser and validator
    exits     process exit statuses
    timeouts  the timeouts that must stay ordered, derived from config
    trust     the token beside the broker's workers socket

Layers, each importing only those below it (tests/test_layers.py):
front-ends (srw, proxy, fs) > storage > broker > runtime > core.
"""
from importlib import metadata

try:
    __version__ = metadata.version("srw")  # pyproject.toml's, defined there once
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
