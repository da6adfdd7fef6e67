"""The shape of what FsClient reads: directory heads and buckets (and the old
one-value form), inode objects, and the script's replies.

Directory heads live under ``fs:d:<ino>``, buckets beside them, in the same
store that every script and client with the ``write`` right can write, so each one is hostile
until this module has checked it; ``history/fs.py``'s reply is checked too.
A value of the wrong shape raises ``BadShape`` saying what is wrong (FsClient
turns it into EIO).  The format is in ``history/fs.py``'s header.

Entries are checked where they are used, so a lookup costs one entry's check,
not the directory's: ``entry`` for the one a path step takes, ``listing`` for
all of them.  A name no directory can hold (empty, ``.``, ``..``, a ``/`` or
NUL inside, over NAME_MAX bytes) is skipped by ``listing`` and can never be
looked up (``FsClient``'s paths never have such a component), so a hostile
writer cannot make ``ls`` show ``..`` or ``x/y``.
"""
from __future__ import annotations

import errno
import hashlib
import re
import stat
from typing import NamedTuple

import msgpack

__all__ = ["BadShape", "Entry", "directory", "entry", "listing", "intent", "reply",
           "name_ok", "one_line", "show_names", "NAME_MAX", "MAX_ENTRIES", "inode", "own",
           "unpack", "KINDS", "bucket", "buckets", "where", "slot", "MAX_DEPTH", "layout"]

NAME_MAX = 255
# Entries (or intents) in one directory.  An entry FsClient writes takes over
# 30 msgpack bytes, so a directory reaches the default max_value (64 MiB) at
# about 2 million entries, before this; the limit stops a value of 2-byte pairs
# from decoding into a map of 30 million.
MAX_ENTRIES = 1 << 22
# Seconds either side of 1970 (the years 1425 to 2514): wider than anything the
# kernel's utimens can give (int64 nanoseconds), narrow enough for localtime().
MTIME_LIMIT = 2 ** 34
SIZE_LIMIT = 2 ** 63            # st_size is an off_t
INO = re.compile(r"root|[0-9a-f]{16}")        # ROOT, or FsClient's new_ino()
IID = re.compile(r"[0-9A-Za-z_-]{1,64}")      # a rename's intent id
ERRNO_NAMES = frozenset(name for name in dir(errno) if name.startswith("E"))
FIELDS = ("e", "i", "a", "dead")             # a directory of the old form, one value
HEAD = ("b", "k", "n", "s", "i", "a", "dead")  # a directory's head (its entries in buckets)
# Buckets (history/fs.py's header): a map of 2**D bytes, D at most MAX_DEPTH,
# each a bucket's depth; a name's slot is its keyed blake2b (SALT bytes of key).
MAX_DEPTH = 16
SALT = 8


class BadShape(ValueError):
    """A value that is not what the tree needs; the message says what is wrong."""


# An entry's kind: its file type.
KINDS = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK, "p": stat.S_IFIFO,
         "c": stat.S_IFCHR, "b": stat.S_IFBLK, "s": stat.S_IFSOCK}
ID_LIMIT = 2 ** 32              # uid_t, gid_t
RDEV_LIMIT = 2 ** 64            # dev_t
TARGET_MAX = 4096               # a symlink's target, bytes (PATH_MAX)


class Entry(NamedTuple):
    """[ino, kind, mode, size, mtime, uid, gid, atime, ctime, extra]: `extra`
    is a symlink's target, a device's rdev, else 0.  An entry of the first five
    fields alone (written before owners and times were kept) is read as owned
    by root, with atime and ctime its mtime."""
    ino: str
    kind: str          # a key of KINDS
    mode: int          # permission bits
    size: int
    mtime: float
    uid: int = 0
    gid: int = 0
    atime: float = 0.0
    ctime: float = 0.0
    extra: str | int = 0
    linked: int = 0    # 1: hard-linked, its attributes in its inode object (``inode``)

    @property
    def is_dir(self) -> bool:
        return self.kind == "d"

    @property
    def st_mode(self) -> int:
        return KINDS[self.kind] | self.mode


def directory(raw: bytes) -> dict:
    """The directory head in `raw` (or a whole directory of the old form, with
    "e"; a head gets "e": None): its fields of the right types (and "m", its
    own attributes, when present), its bucket map, intents and applied renames
    checked (there are few: renames in flight).  Entries are only known to be
    a map: check them with `entry`/`listing`."""
    d = _unpack(raw, "a directory object")
    if isinstance(d, dict) and d.keys() - {"m"} == set(HEAD):
        _head(d)
        d["e"] = None
    elif not isinstance(d, dict) or d.keys() - {"m"} != set(FIELDS):
        raise BadShape(f"not a directory object: {_show(d)}, not a map of {', '.join(HEAD)}"
                       f" (or {', '.join(FIELDS)}) and m")
    if not ((d["e"] is None or isinstance(d["e"], dict)) and isinstance(d["i"], dict)
            and isinstance(d["a"], dict) and isinstance(d["dead"], bool)):
        raise BadShape("a directory's e, i, a are not maps or its dead is not a bool")
    if "m" in d:
        d["m"] = own(d["m"])
    for iid, value in d["i"].items():
        _iid(iid)
        intent(value)
    for iid, err in d["a"].items():
        _iid(iid)
        _errno_name(err, f"applied rename {iid}")
    return d


def _head(d: dict) -> None:
    m, salt, n, subdirs = d["b"], d["k"], d["n"], d["s"]
    depth = len(m).bit_length() - 1 if type(m) is bytes else -1
    if not (0 <= depth <= MAX_DEPTH and len(m) == 1 << depth and max(m) <= depth):
        raise BadShape(f"a directory's bucket map is {_show(m)}, not 2**D bytes of "
                       f"depths up to D <= {MAX_DEPTH}")
    if not (type(salt) is bytes and len(salt) == SALT):
        raise BadShape(f"a directory's salt is {_show(salt)}, not {SALT} bytes")
    if not (type(n) is int and type(subdirs) is int and 0 <= subdirs <= n < SIZE_LIMIT):
        raise BadShape(f"a directory's counts are {_show(n)}/{_show(subdirs)}, not "
                       "entries >= subdirectories >= 0")


def where(d: dict, name: str) -> tuple[int, int]:
    """(depth, prefix) of the bucket of directory head `d` for `name`."""
    h = slot(d["k"], name)
    depth = d["b"][h % len(d["b"])]
    return depth, h % (1 << depth)


def slot(salt: bytes, name: str) -> int:
    """A name's slot (history/fs.py's `slot`, the same)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"), key=salt,
                                          digest_size=8).digest(), "little")


def buckets(d: dict) -> list[tuple[int, int]]:
    """(depth, prefix) of each bucket the map of head `d` names, once each."""
    m = d["b"]
    return [(m[i], i) for i in range(len(m)) if i < 1 << m[i]]


def layout(entries: dict, salt: bytes) -> tuple[dict, dict]:
    """(head, {(depth, prefix): bucket}) of a directory of `entries`, as
    history/fs.py lays out one it moves from the old form: buckets of one
    depth, half full on average.  For tests and benches that need a large
    directory without an exec per entry."""
    depth = 0
    while len(entries) > 64 << depth and depth < MAX_DEPTH:
        depth += 1
    buckets = {(depth, prefix): {} for prefix in range(1 << depth)}
    for name, value in entries.items():
        buckets[(depth, slot(salt, name) % (1 << depth))][name] = value
    subdirs = sum(1 for v in entries.values() if v[1] == "d")
    head = {"b": bytes([depth]) * (1 << depth), "k": salt, "n": len(entries), "s": subdirs,
            "i": {}, "a": {}, "dead": False}
    return head, buckets


def bucket(raw: bytes) -> dict:
    """A bucket: a map of entries (each checked where it is used)."""
    b = _unpack(raw, "a bucket")
    if not isinstance(b, dict):
        raise BadShape(f"a bucket is {_show(b)}, not a map of entries")
    return b


def inode(value, ino: str) -> Entry:
    """A hard-linked entry's inode object [kind, mode, size, mtime, uid, gid,
    atime, ctime, extra, nlink] as (Entry, nlink), checked as an entry."""
    if not (type(value) is list and len(value) == 10 and type(value[9]) is int
            and 0 < value[9] < ID_LIMIT):
        raise BadShape(f"an inode is {_show(value)}, not [kind, mode, size, mtime, uid, "
                       "gid, atime, ctime, extra, nlink]")
    return entry([ino, *value[:9], 1]), value[9]


def own(m) -> list:
    """A directory's own [mode, uid, gid, atime, mtime, ctime], checked."""
    if not (type(m) is list and len(m) == 6 and type(m[0]) is int and 0 <= m[0] <= 0o7777
            and all(type(i) is int and 0 <= i < ID_LIMIT for i in m[1:3])
            and all(_time_ok(t) for t in m[3:])):
        raise BadShape(f"a directory's m is {_show(m)}, not [mode, uid, gid, atime, "
                       "mtime, ctime] in range")
    return m


def entry(value) -> Entry:
    """[ino, kind, mode, size, mtime, uid, gid, atime, ctime, extra] (or its
    first five) as an Entry, each field checked."""
    if not _entry_ok(value):
        raise BadShape(_entry_fault(value))
    return _made(value)


def _made(value: list) -> Entry:
    if len(value) == 5:
        return Entry(*value, 0, 0, value[4], value[4], 0)
    return Entry(*value)


def listing(entries: dict) -> tuple[dict[str, Entry], list[str]]:
    """(name -> Entry, names skipped) of a directory's entries: every entry
    checked; a name no directory can hold is skipped, not an error."""
    out, skipped = {}, []
    for name, value in entries.items():
        if type(name) is not str:
            raise BadShape(f"an entry's name is {_show(name)}, not a string")
        if not name_ok(name):
            skipped.append(name)
        elif _entry_ok(value):
            out[name] = _made(value)
        else:
            raise BadShape(f"{_show(name)}: {_entry_fault(value)}")
    return out, skipped


def _entry_ok(value) -> bool:
    """The check of `entry`, kept to type tests and comparisons: a listing runs
    it on every entry (~2 us each).  A NaN fails the range test."""
    if type(value) is not list or len(value) not in (5, 10, 11):
        return False
    ino, kind, mode, size, mtime = value[:5]
    if not (type(ino) is str and INO.fullmatch(ino) is not None and kind in KINDS
            and type(mode) is int and 0 <= mode <= 0o7777
            and type(size) is int and 0 <= size < SIZE_LIMIT and _time_ok(mtime)):
        return False
    if len(value) == 5:
        return True
    uid, gid, atime, ctime, extra = value[5:10]
    return ((len(value) == 10 or _linked_ok(kind, value[10]))
            and type(uid) is int and 0 <= uid < ID_LIMIT and type(gid) is int
            and 0 <= gid < ID_LIMIT and _time_ok(atime) and _time_ok(ctime)
            and _extra_ok(kind, extra))


def _linked_ok(kind: str, linked) -> bool:
    return type(linked) is int and (linked == 0 or linked == 1 and kind != "d")


def _time_ok(t) -> bool:
    return type(t) in (float, int) and -MTIME_LIMIT < t < MTIME_LIMIT


def _extra_ok(kind: str, extra) -> bool:
    if kind == "l":
        return type(extra) is str and 0 < len(extra) and _target_ok(extra)
    if kind in ("c", "b"):
        return type(extra) is int and 0 <= extra < RDEV_LIMIT
    return extra == 0 and type(extra) is int


def _target_ok(target: str) -> bool:
    if "\0" in target:
        return False
    try:
        return len(target.encode("utf-8")) <= TARGET_MAX
    except UnicodeEncodeError:
        return False


def _entry_fault(value) -> str:
    """What is wrong with an entry `_entry_ok` refused."""
    if not (isinstance(value, list) and len(value) in (5, 10, 11)):
        return (f"an entry is {_show(value)}, not [ino, kind, mode, size, mtime, "
                "uid, gid, atime, ctime, extra]")
    ino, kind, mode, size, mtime = value[:5]
    if not (type(ino) is str and INO.fullmatch(ino)):
        return f"an entry's ino is {_show(ino)}, not 'root' or 16 hex digits"
    if kind not in KINDS:
        return f"an entry's kind is {_show(kind)}, not one of {''.join(KINDS)}"
    if not (type(mode) is int and 0 <= mode <= 0o7777):
        return f"an entry's mode is {_show(mode)}, not 0 to 0o7777"
    if not (type(size) is int and 0 <= size < SIZE_LIMIT):
        return f"an entry's size is {_show(size)}, not 0 to 2**63-1"
    if not _time_ok(mtime):
        return f"an entry's mtime is {_show(mtime)}, not seconds within 2**34 of 1970"
    if len(value) == 5:
        return "an entry is not valid"
    uid, gid, atime, ctime, extra = value[5:10]
    if len(value) == 11 and not _linked_ok(kind, value[10]):
        return f"an entry's linked is {_show(value[10])}, not 0 or 1 (and not a directory's)"
    if not all(type(i) is int and 0 <= i < ID_LIMIT for i in (uid, gid)):
        return f"an entry's uid or gid is {_show(uid)}/{_show(gid)}, not 0 to 2**32-1"
    if not (_time_ok(atime) and _time_ok(ctime)):
        return "an entry's atime or ctime is not seconds within 2**34 of 1970"
    return f"an entry's extra is {_show(extra)}, not what a kind {kind!r} holds"


def intent(value) -> list:
    """[name, entry, to_ino, to_name, replace_ino]: a rename out, half done."""
    if not (isinstance(value, list) and len(value) == 5):
        raise BadShape(f"an intent is {_show(value)}, not [name, entry, to, to_name, replace]")
    name, moved, to, to_name, replace = value
    if not (isinstance(name, str) and isinstance(to_name, str)):
        raise BadShape("an intent's names are not strings")
    _ino(to)
    if replace is not None:
        _ino(replace)
    return [name, entry(moved), to, to_name, replace]


def reply(raw: bytes) -> dict:
    """The script's reply: {"err": "" or an errno name}, plus "entry" (an Entry),
    "result" (None, "" or an errno name), "why" (a string) and "gone" ([ino,
    size] of a file whose contents the caller removes) when present."""
    r = _unpack(raw, "a reply")
    if not isinstance(r, dict) or "err" not in r:
        raise BadShape(f"the reply is {_show(r)}, not a map with err")
    _errno_name(r["err"], "the reply's err")
    if "entry" in r:
        r["entry"] = entry(r["entry"])
    if r.get("result") is not None:
        _errno_name(r["result"], "the reply's result")
    if not isinstance(r.get("why", ""), str):
        raise BadShape("the reply's why is not a string")
    if "m" in r:
        r["m"] = own(r["m"])
    if r.get("unref") is not None:
        _ino(r["unref"])
    if r.get("gone") is not None:
        gone = r["gone"]
        if not (isinstance(gone, list) and len(gone) == 2 and type(gone[1]) is int
                and 0 <= gone[1] < SIZE_LIMIT):
            raise BadShape(f"the reply's gone is {_show(gone)}, not [ino, size]")
        _ino(gone[0])
    return r


def name_ok(name: str) -> bool:
    """Whether a directory may hold `name` (what split_path lets through)."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        return False
    if len(name) <= NAME_MAX // 4:   # 4 bytes a character at most; msgpack's are UTF-8
        return True
    try:
        return len(name.encode("utf-8")) <= NAME_MAX
    except UnicodeEncodeError:   # a lone surrogate: no UTF-8 file name
        return False


def one_line(text: str, limit: int = 300) -> str:
    """`text` cut to `limit` characters, anything unprintable escaped: a hostile
    string cannot break a log line in two or reach the terminal raw."""
    text = text[:limit]
    return text if text.isprintable() else "".join(
        c if c.isprintable() else repr(c)[1:-1] for c in text)


def show_names(names: list, limit: int = 3) -> str:
    """A few of `names`, each cut short and printable, for one log line."""
    shown = ", ".join(_show(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# Fields ---------------------------------------------------------------------------

def unpack(raw: bytes, what: str):
    """msgpack `raw` with this module's bounds; BadShape if it does not decode."""
    return _unpack(raw, what)


def _unpack(raw: bytes, what: str):
    try:
        return msgpack.unpackb(raw, raw=False, max_array_len=11, max_map_len=MAX_ENTRIES)
    except Exception as exc:  # msgpack raises several unrelated types
        why = str(exc) or type(exc).__name__
        raise BadShape(f"not {what}: the msgpack does not decode ({_show(why, 80)})") from None


def _ino(value) -> None:
    if not (isinstance(value, str) and INO.fullmatch(value)):
        raise BadShape(f"an ino is {_show(value)}, not 'root' or 16 hex digits")


def _iid(value) -> None:
    if not (isinstance(value, str) and IID.fullmatch(value)):
        raise BadShape(f"an intent id is {_show(value)}, not 1 to 64 letters and digits")


def _errno_name(value, what: str) -> None:
    if not (isinstance(value, str) and (value == "" or value in ERRNO_NAMES)):
        raise BadShape(f"{what} is {_show(value)}, not an errno name")


def _show(value, limit: int = 40) -> str:
    """A short, printable account of a hostile value for a message."""
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, (str, bytes)) and len(value) > limit:   # huge: cut before repr
        return repr(value[:limit]) + f"... ({len(value)} long)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
