"""Hostile directory values: whatever anyone with the `write` right puts under
fs:d:<ino> (of the root or of a subdirectory), FsClient, `srw fs` and the mount
answer EIO for a value of the wrong shape, skip names no directory can hold,
never crash, and serve the rest of the tree as before."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import textwrap

import msgpack
import pytest

from fs import shape
from fs.client import FsClient, FsError, bucket_key
from storage.client import NotFound, Session

from conftest import retire, wait_until
from fs_support import mount, needs_fuse, start_cluster, unmount

# A script that answers whatever reply the request carries: the client must
# check the directory script's reply as it checks the store's values.
LIAR = textwrap.dedent("""\
    import msgpack
    __return_data = msgpack.unpackb(__input_binary_data_tuple[0], raw=False)["reply"]
""")

GOOD = ["0123456789abcdef", "f", 0o644, 5, 1.7e9]


def directory(entries: dict | None = None, **fields) -> bytes:
    return msgpack.packb({"e": {"f": GOOD} if entries is None else entries,
                          "i": {}, "a": {}, "dead": False, **fields})


def head(**fields) -> bytes:
    """A directory head (entries in buckets) of depth 0: its one bucket is the
    real directory's own (a directory of up to 128 entries has one)."""
    return msgpack.packb({"b": b"\0", "k": bytes(8), "n": 1, "s": 0, "i": {}, "a": {},
                          "dead": False, **fields})


def f_with(index: int, value) -> bytes:
    """A directory whose entry "f" has `value` as its field `index`."""
    entry = list(GOOD)
    entry[index] = value
    return directory({"f": entry})


# (value, where the damage shows): "value" = not a directory object at all (the
# script refuses it too), "read" = every read of the directory (f's entry is
# bad, or the renames in flight), "listing" = only a listing (another entry).
HOSTILE = {
    "array [1]": (msgpack.packb([1]), "value"),
    "not msgpack": (b"\xc1", "value"),
    "truncated": (b"\x84\xa1e", "value"),
    "bad utf-8": (b"\xa2\xff\xfe", "value"),
    "int map key": (msgpack.packb({1: 2}), "value"),
    "missing fields": (msgpack.packb({"e": {}}), "value"),
    "extra field": (directory(x=1), "value"),
    "entries not a map": (directory([1]), "value"),
    "dead not a bool": (directory(dead=1), "value"),
    "intents not a map": (directory(i=[]), "value"),
    "entry not an array": (directory({"f": 7}), "read"),
    "entry of 4 fields": (directory({"f": GOOD[:4]}), "read"),
    "entry of 6 fields": (directory({"f": GOOD + [0]}), "read"),
    "ino huge": (f_with(0, "a" * 1_000_000), "read"),
    "ino a path": (f_with(0, "../../x"), "read"),
    "kind x": (f_with(1, "x"), "read"),
    "mode a string": (f_with(2, "rwx"), "read"),
    "mode a bool": (f_with(2, True), "read"),
    "mode too big": (f_with(2, 0o77777), "read"),
    "size negative": (f_with(3, -1), "read"),
    "size 2**63": (f_with(3, 2 ** 63), "read"),
    "mtime nan": (f_with(4, float("nan")), "read"),
    "mtime 1e300": (f_with(4, 1e300), "read"),
    "mtime a string": (f_with(4, "now"), "read"),
    "intent not an array": (directory(i={"x1": 1}), "read"),
    "intent to a path": (directory(i={"x1": ["f", GOOD, "../etc", "g", None]}), "read"),
    "applied not an errno": (directory(a={"x1": "__name__"}), "read"),
    "name not a string": (directory({"f": GOOD, b"g": GOOD}), "listing"),
    "another entry bad": (directory({"f": GOOD, "g": [1, 2]}), "listing"),
    "head map of 3": (head(b=b"\0\0\0"), "value"),
    "head map too deep": (head(b=b"\1"), "value"),
    "head map 2**17": (head(b=bytes(1 << 17)), "value"),
    "head map a list": (head(b=[0]), "value"),
    "head salt short": (head(k=b"salt"), "value"),
    "head count negative": (head(n=-1), "value"),
    "head and old form": (head(e={}), "value"),
}

BAD_NAMES = ["..", ".", "", "x/y", "a\x00b", "n" * 256, "\u00e9" * 128, "h" * 1_000_000]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("fshostile"), groups=1,
                            scripts={"liar.py": LIAR})
    yield cluster
    retire([cluster])


@pytest.fixture(scope="module")
def session(cluster):
    with Session(cluster.path) as session:
        yield session


PLANTED = ["/", "/sub"]    # where the hostile values go, in turn


@pytest.fixture(scope="module")
def tree(session) -> dict[str, str]:
    """/sub/f ("hello"), /other and /third; the key of each directory."""
    fs = FsClient(session)
    for where in ("/sub", "/other", "/third"):
        fs.mkdir(where)
    fs.write_file("/sub/f", b"hello")
    return {"/": "fs:d:root", **{where: "fs:d:" + fs.stat(where).ino
                                 for where in ("/sub", "/other", "/third")}}


@pytest.fixture
def fs(session):
    return FsClient(session)


@pytest.fixture(scope="module")
def mounted(cluster, tree):
    """(mount point, the `srw mount` process: its log lines in .log)."""
    where = cluster.root / "mnt"
    proc = mount(cluster, where)
    try:
        yield where, proc
    finally:
        unmount(proc, where)


@pytest.fixture
def mnt(mounted):
    return mounted[0]


def logged(proc, text: str) -> bool:
    return any(text.encode() in line for line in list(proc.log))


@contextlib.contextmanager
def planted(session: Session, key: str, value: bytes):
    """`value` under `key` for the block, then the value it replaced (or none:
    an empty directory may have none)."""
    try:
        before = session.read(key)
    except NotFound:
        before = None
    assert all(r.ok for r in session.write(key, value))
    try:
        yield
    finally:
        restored = session.remove(key) if before is None else session.write(key, before)
        assert all(r.ok for r in restored)


def eio(call) -> FsError:
    with pytest.raises(FsError) as caught:
        call()
    assert caught.value.errno == errno.EIO, caught.value
    return caught.value


def child(where: str, name: str) -> str:
    return f"{where.rstrip('/')}/{name}"


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_directory_value_is_eio_for_the_client(session, tree, fs, case):
    value, scope = HOSTILE[case]
    for where in PLANTED:
        with planted(session, tree[where], value):
            eio(lambda: fs.readdir(where))
            if scope == "listing":
                assert fs.stat(child(where, "f")).ino == GOOD[0]
            else:
                eio(lambda: fs.stat(child(where, "f")))
                eio(lambda: fs.read_file(child(where, "f")))
            if scope == "value":   # the directory script answers a clean EIO
                new = child(where, "new")
                assert eio(lambda: fs.mkdir(new)).filename == new
            if where != "/":       # the rest of the tree is served as before
                assert set(fs.readdir("/")) == {"sub", "other", "third"}
        assert set(fs.readdir(where)) == ({"f"} if where == "/sub" else
                                          {"sub", "other", "third"})
    assert fs.read_file("/sub/f") == b"hello"


@needs_fuse
@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_directory_value_is_eio_in_the_mount(session, tree, mounted, case):
    mnt, proc = mounted
    value, _scope = HOSTILE[case]
    for where in PLANTED:
        with planted(session, tree[where], value):
            with pytest.raises(OSError) as caught:
                os.listdir(mnt / where.lstrip("/"))
            assert caught.value.errno == errno.EIO, caught.value
            if where != "/":
                assert set(os.listdir(mnt)) == {"sub", "other", "third"}
    assert os.listdir(mnt / "sub") == ["f"]
    assert (mnt / "sub" / "f").read_bytes() == b"hello"
    wait_until(lambda: logged(proc, tree["/sub"]), 5, "the reason in the mount's log")
    assert not logged(proc, "Traceback"), b"".join(proc.log).decode()


def with_bad_names(fs: FsClient, where: str = "/sub") -> bytes:
    """A value for `where` with /sub/f's entry as `f` and, beside it, one entry
    under each bad name."""
    entries = {"f": list(fs.stat("/sub/f"))}
    for i, name in enumerate(BAD_NAMES):
        entries[name] = [f"{i:016x}", "f", 0o644, 0, 1.7e9]
    return directory(entries)


def test_names_no_directory_can_hold_are_skipped_with_one_log_line(session, tree, fs,
                                                                   caplog):
    with planted(session, tree["/sub"], with_bad_names(fs)):
        with caplog.at_level(logging.WARNING, logger="srw.fs"):
            assert set(fs.readdir("/sub")) == {"f"}
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert tree["/sub"] in caplog.text and f"{len(BAD_NAMES)} names" in caplog.text
        with pytest.raises(FsError) as missing:      # "x" of "x/y" is not there
            fs.stat("/sub/x/y")
        assert missing.value.errno == errno.ENOENT
        fs.mkdir("/sub/new")                          # the script keeps working
        assert set(fs.readdir("/sub")) == {"f", "new"}
        fs.rmdir("/sub/new")
        assert fs.read_file("/sub/f") == b"hello"


@needs_fuse
def test_the_mount_skips_names_no_directory_can_hold(session, tree, fs, mounted):
    mnt, proc = mounted
    with planted(session, tree["/sub"], with_bad_names(fs)):
        assert os.listdir(mnt / "sub") == ["f"]
        assert (mnt / "sub" / "f").read_bytes() == b"hello"
    wait_until(lambda: logged(proc, "names no directory can hold"), 5, "the mount's log line")


def run_at_once(cluster, commands: list[list[str]]) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of `srw fs ...` commands run side by side."""
    procs = [cluster.srw("fs", *cmd) for cmd in commands]
    outs = [proc.communicate(timeout=30) for proc in procs]
    return [(proc.returncode, out.decode(), err.decode())
            for proc, (out, err) in zip(procs, outs)]


def assert_one_line_eio(results, commands) -> None:
    for (code, _out, err), cmd in zip(results, commands):
        assert code == 1 and "Traceback" not in err, (cmd, err)
        lines = err.splitlines()
        assert lines[-1] == f"srw: {cmd[-1]}: Input/output error", (cmd, err)
        assert len(lines) <= 2, (cmd, err)    # at most the reason's log line before it


def test_srw_fs_prints_one_line_not_a_traceback(cluster, session, tree, fs):
    """Three hostile subdirectories at once, then a hostile root: few commands,
    run side by side (each is a Python start)."""
    eio_commands = [["ls", "/sub"], ["get", "/sub/f"], ["mkdir", "/other/new"]]
    with contextlib.ExitStack() as stack:
        for where, value in (("/sub", HOSTILE["kind x"][0]),
                             ("/other", HOSTILE["not msgpack"][0]),
                             ("/third", with_bad_names(fs, "/third"))):
            stack.enter_context(planted(session, tree[where], value))
        *results, (code, out, err) = run_at_once(cluster, eio_commands + [["ls", "/third"]])
    assert_one_line_eio(results, eio_commands)
    assert (code, out) == (0, "f\n") and len(err.splitlines()) == 1, err
    on_root = [["ls", "/"], ["stat", "/sub"]]
    with planted(session, tree["/"], HOSTILE["array [1]"][0]):
        assert_one_line_eio(run_at_once(cluster, on_root), on_root)


REPLIES = {
    "not msgpack": b"\xc1",
    "an array": msgpack.packb([1]),
    "no err": msgpack.packb({}),
    "err a number": msgpack.packb({"err": 5}),
    "err not an errno": msgpack.packb({"err": "__name__"}),
    "err unknown": msgpack.packb({"err": "ENOPE"}),
    "entry an array of 1": msgpack.packb({"err": "", "entry": [1]}),
    "entry size negative": msgpack.packb({"err": "", "entry": GOOD[:3] + [-5, 0]}),
    "result not an errno": msgpack.packb({"err": "", "result": "__dict__"}),
    "result a number": msgpack.packb({"err": "", "result": 7}),
}


@pytest.mark.parametrize("case", list(REPLIES))
def test_a_hostile_script_reply_is_eio(session, case):
    liar = FsClient(session, script="liar.py")
    eio(lambda: liar.call("root", "mkdir", "/p", reply=REPLIES[case]))


@pytest.mark.parametrize("fields", [{"mtime": 1e300}, {"mtime": float("nan")},
                                    {"mode": 0o77777}, {"size": -1}])
def test_setattr_refuses_what_an_entry_cannot_hold(fs, tree, fields):
    """Else the client would write an entry every reader then finds bad (EIO)."""
    with pytest.raises(FsError) as refused:
        fs.setattr("/sub/f", fs.stat("/sub/f"), **fields)
    assert refused.value.errno == errno.EINVAL
    assert set(fs.readdir("/sub")) == {"f"}


@needs_fuse
def test_every_mtime_the_kernel_can_give_is_kept(fs, tree, mnt):
    """utimens carries int64 nanoseconds: all of them fit an entry's mtime."""
    for ns in (2 ** 63 - 1, -2 ** 63, 0):
        os.utime(mnt / "sub" / "f", ns=(0, ns))
        assert fs.stat("/sub/f").mtime == pytest.approx(ns / 1e9)
    assert os.listdir(mnt / "sub") == ["f"]


@pytest.mark.parametrize("name, ok", [
    ("a", True), (".hidden", True), ("...", True), ("n" * 255, True), ("n" * 256, False),
    ("\u00e9" * 127, True), ("\u00e9" * 128, False),            # 2 bytes each
    ("\U0001f600" * 63, True), ("\U0001f600" * 64, False),      # 4 bytes each
    ("", False), (".", False), ("..", False), ("x/y", False), ("a\x00b", False)])
def test_a_name_is_held_by_its_utf8_bytes(name, ok):
    assert shape.name_ok(name) is ok


def test_a_hostile_string_stays_one_printable_log_line():
    line = shape.one_line("a\nb\x1b[31m\u202e" + "x" * 1000)
    assert line.isprintable() and len(line) < 350 and line.startswith("a\\nb\\x1b[31m")


@pytest.mark.parametrize("bucket", [msgpack.packb([1]), b"\xc1", msgpack.packb({"f": 7})])
def test_a_hostile_bucket_is_eio(session, tree, fs, bucket):
    """A bucket of /sub (its only one: depth 0) that is not a map of entries."""
    key = bucket_key(tree["/sub"][len("fs:d:"):], 0, 0)
    with planted(session, key, bucket):
        eio(lambda: fs.readdir("/sub"))
        eio(lambda: fs.stat("/sub/f"))
        eio(lambda: fs.create("/sub/f"))        # the script reads f's bucket
        assert set(fs.readdir("/")) == {"sub", "other", "third"}
    assert fs.read_file("/sub/f") == b"hello"


def test_a_name_in_a_bucket_it_does_not_hash_to_is_skipped(session, tree, fs):
    """A head of depth 1 over /sub's one bucket: the names that hash to the
    other half are left out of the listing (and not found there)."""
    salt = bytes(8)
    half = shape.slot(salt, "f") % 2
    planted_head = head(b=bytes([1, 1]), k=salt)
    ino = tree["/sub"][len("fs:d:"):]
    entry = msgpack.unpackb(session.read(bucket_key(ino, 0, 0)), raw=False)["f"]
    g = next(name for name in (f"g{i}" for i in range(100)) if shape.slot(salt, name) % 2 == half)
    with planted(session, tree["/sub"], planted_head), \
            planted(session, bucket_key(ino, 1, half), msgpack.packb({"f": entry})), \
            planted(session, bucket_key(ino, 1, 1 - half), msgpack.packb({g: entry})):
        assert set(fs.readdir("/sub")) == {"f"}
        assert fs.stat("/sub/f").ino == entry[0]
        with pytest.raises(FsError) as missing:
            fs.stat(f"/sub/{g}")
        assert missing.value.errno == errno.ENOENT
