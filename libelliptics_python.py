"""The 2011 Elliptics Python binding, as much of it as a python.init of the time used.

The python.init of the original post runs unchanged apart from its address::

    import sys
    sys.path.append('/usr/lib')
    from libelliptics_python import *

    log = elliptics_log_file('/tmp/data/history.2/python.log', 40)
    n = elliptics_node_python(log)
    n.add_groups([1])
    n.add_remote('127.0.0.1', 1025)
    __return_data = 'unused'

and its scripts call ``n.read_data(key)``, ``n.write_data(key, data)``,
``n.remove(key)`` (``n.lookup(key)`` too).  What the calls mean here:

- ``add_remote(host, port)`` names a node's storage front-end,
  ``tcp://host:port``.  Nothing is opened then (python.init runs in the pool
  parent, before the fork); at the first data call in a worker the handle asks
  that node for the cluster's routes, as an Elliptics client learnt the route
  table from its remote, and from then on talks to the owner of each key
  directly.  Several remotes are tried in order.
- ``add_groups(list)`` limits reads and writes to those groups.  A group the
  cluster does not have is left out, with a warning in the node's log (an
  Elliptics client had no node to send its copy to either), so the post's
  ``[1,2,3]`` also runs on a smaller cluster; none of them existing is an
  error at the first data call.
- ``elliptics_log_file(path, level)``: ``level`` is a logging level number
  (40 = ERROR, as in the post).  A file that cannot be opened (missing folder,
  no permission) never stops the node: the lines go to the node's own log,
  with one warning saying so.
"""
from __future__ import annotations

import logging

from storage.handle import StorageHandle

__all__ = ["elliptics_log_file", "elliptics_node_python"]

_warn = logging.getLogger("srw.libelliptics_python")


class elliptics_log_file:  # noqa: N801 - the 2011 name
    """A log for the handle: ``path`` appended to, or the node's log if it cannot be."""

    def __init__(self, path: str, level: int):
        self.path, self.level = path, int(level)
        self.logger = logging.getLogger("libelliptics_python")
        self.logger.setLevel(self.level)
        for old in self.logger.handlers:  # python.init may run again (SIGHUP)
            old.close()
        try:
            handler = logging.FileHandler(path)
        except OSError as exc:
            self.logger.handlers[:] = []
            self.logger.propagate = True
            _warn.warning("libelliptics_python: cannot open log file %s (%s); its lines go "
                          "to the node's log instead", path, exc.strerror or exc)
            return
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(process)d %(levelname)s %(message)s"))
        self.logger.handlers[:] = [handler]
        self.logger.propagate = False


class elliptics_node_python(StorageHandle):  # noqa: N801 - the 2011 name
    """A storage handle with the 2011 calls; connects lazily, after the fork."""

    def __init__(self, log: elliptics_log_file | None = None):
        super().__init__(logger=log.logger if log is not None else None)

    def add_remote(self, host: str, port: int) -> None:  # type: ignore[override]
        """The storage node at tcp://host:port tells the cluster (at first use)."""
        if not isinstance(host, str) or not host or not 0 < int(port) < 65536:
            raise ValueError(f"add_remote({host!r}, {port!r}): give a host name and a port")
        super().add_remote(f"tcp://{host}:{int(port)}")
