"""``srw fs ...`` and ``srw mount``: registered by srw/cli.py through ``register``.

A failed operation prints one line, ``srw: PATH: <strerror>``, and exits 1; an
EIO from a value in the store that is not what it should be has its reason on
the line before (``srw: fs:d:<ino>: ...``, from the client's log).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import stat
import sys
import time
from typing import TYPE_CHECKING

# The commands import .client when they run: every `srw` process builds this
# parser, and a node's roles need no storage client (0.1-0.3 s at start).
if TYPE_CHECKING:
    from .client import Entry, FsClient


def register(sub, common: argparse.ArgumentParser, session_factory) -> None:
    """Add ``fs`` (with its commands) and ``mount`` to srw's subparsers;
    `session_factory(config, args)` builds the Session (srw.cli._session: --key)."""
    fs = sub.add_parser("fs", parents=[common], help="the cluster as directories and files")
    cmds = fs.add_subparsers(dest="fs_command", required=True, metavar="FS_COMMAND")
    for name, text, func, nargs in COMMANDS:
        cmd = cmds.add_parser(name, parents=[common], help=text)
        cmd.add_argument("paths", nargs=nargs, metavar="PATH")
        if name == "ls":
            cmd.add_argument("-l", dest="long", action="store_true", help="mode, size, mtime")
        cmd.set_defaults(func=_run(func, session_factory))
    mount = sub.add_parser("mount", parents=[common], help="mount the tree with FUSE",
                           description="Mount the cluster's tree at MOUNTPOINT in the "
                           "foreground; Ctrl-C or fusermount3 -u MOUNTPOINT unmounts.")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    mount.add_argument("--allow-other", action="store_true",
                       help="let other users use the mount (root, or user_allow_other "
                       "in /etc/fuse.conf); use with --default-permissions")
    mount.add_argument("--default-permissions", action="store_true",
                       help="the kernel enforces each entry's mode and owner")
    mount.add_argument("--attr-timeout", type=float, default=1.0, metavar="SECONDS",
                       help="how long the kernel keeps a name's attributes (default 1; "
                       "0: a change through one hard link shows through the others at once)")
    mount.add_argument("--no-local-reads", dest="local_reads", action="store_false",
                       help="read every value over the network, even from a node on "
                       "this host whose store this process may read")
    mount.set_defaults(func=_mount(session_factory))


def _run(func, session_factory):
    def command(config, args) -> int:
        logging.basicConfig(level=logging.WARNING, format="srw: %(message)s")
        from .client import FsClient
        with session_factory(config, args) as session:
            return _one_line(lambda: func(FsClient(session), args) or 0)
    return command


def _mount(session_factory):
    def command(config, args) -> int:
        from .mount import mount
        return _one_line(lambda: mount(lambda: session_factory(config, args), args.mountpoint,
                                       args.allow_other, args.default_permissions,
                                       args.attr_timeout, args.local_reads))
    return command


def _one_line(call) -> int:
    """Run `call`; an FsError becomes ``srw: PATH: <strerror>`` and exit status 1."""
    from .client import FsError
    try:
        return call()
    except FsError as exc:
        print(f"srw: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1


def cmd_mkdir(fs: FsClient, args) -> None:
    for path in args.paths:
        fs.mkdir(path)


def cmd_rmdir(fs: FsClient, args) -> None:
    for path in args.paths:
        fs.rmdir(path)


def cmd_rm(fs: FsClient, args) -> None:
    for path in args.paths:
        fs.unlink(path)


def cmd_mv(fs: FsClient, args) -> None:
    fs.rename(*args.paths)


def cmd_put(fs: FsClient, args) -> None:
    """put LOCAL PATH: a local file (- for stdin) into the tree, a few chunks
    at a time (a file larger than memory too)."""
    from .client import FsError
    local, path = args.paths
    try:
        source = sys.stdin.buffer if local == "-" else open(local, "rb")
    except OSError as exc:
        raise FsError(exc.errno, local) from None
    with contextlib.nullcontext() if local == "-" else source:
        fs.write_file(path, _pieces(source, local))


def _pieces(source, local: str):
    """`source` in whole chunks (fs/client.py whole_chunks); a read error names it."""
    from .client import FsError, whole_chunks
    try:
        yield from whole_chunks(source)
    except OSError as exc:
        raise FsError(exc.errno, local) from None


def cmd_get(fs: FsClient, args) -> None:
    """get PATH: the file's contents on stdout."""
    for chunk in fs.stream(args.paths[0]):
        sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


def cmd_stat(fs: FsClient, args) -> None:
    for path in args.paths:
        print(f"{path}: {describe(fs.stat(path))}")


def cmd_ls(fs: FsClient, args) -> None:
    for path in args.paths or ["/"]:
        entry = fs.stat(path)
        listing = fs.readdir(path) if entry.is_dir else {path.rsplit("/", 1)[-1]: entry}
        for name in sorted(listing):
            print(f"{describe(listing[name])} {name}" if args.long else name)


def describe(entry: Entry) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.mtime))
    return f"{stat.filemode(entry.st_mode)} {entry.size:>10} {when}"


COMMANDS = (
    ("mkdir", "make directories", cmd_mkdir, "+"),
    ("rmdir", "remove empty directories", cmd_rmdir, "+"),
    ("ls", "list directories (-l: mode, size, mtime)", cmd_ls, "*"),
    ("put", "put LOCAL PATH: store a local file (- for stdin)", cmd_put, 2),
    ("get", "get PATH: print a file's contents", cmd_get, 1),
    ("rm", "remove files", cmd_rm, "+"),
    ("mv", "mv OLD NEW: rename, within or across directories", cmd_mv, 2),
    ("stat", "mode, size and mtime of paths", cmd_stat, "+"),
)
