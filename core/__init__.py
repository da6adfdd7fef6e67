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


def __getattr__(name: str) -> str:
    """`core.__version__`, pyproject.toml's (defined there once), read when first
    asked: importing importlib.metadata costs 50-110 ms (its email parser), paid
    by every srw process at start while only the CLI's --version, the broker's
    status and the proxy's status page need it."""
    if name != "__version__":
        raise AttributeError(f"module 'core' has no attribute {name!r}")
    from importlib import metadata
    try:
        version = metadata.version("srw")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        version = "0+unknown"
    globals()["__version__"] = version
    return version
