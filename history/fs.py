# Directories as server-side scripts: one op on one directory per exec.
#
# The client (fs/client.py) execs this script with key="fs:d:<ino>" of the
# directory it changes, in one group, so the node's per-id lock serializes
# every change to that directory; the script reads the directory object, changes
# it and writes it back to every group through `fs_store` (python.init).  A
# script never execs and never waits for another directory's lock: it only
# reads other directories' objects, which are written whole, so a read sees one
# version or the next.
#
# Request (msgpack map): {"op": OP, "dir": INO, ...args}.  Reply (msgpack map):
# {"err": ""} or {"err": "ENOENT"} (an errno name), plus op results.  A stored
# value this script cannot use (anyone with the write right can write fs:d:*)
# is {"err": "EIO", "why": "..."}: the object and each entry or intent an op
# touches are checked here, cheaply; readers check everything (fs/shape.py).
#
# A directory is a head under "fs:d:<ino>" (absent = empty directory) and its
# entries in buckets, so that an op costs the same in a directory of 100,000
# entries as in an empty one: it reads and writes the head and one bucket.
# Head: {"b": map, "k": salt, "n": entries, "s": subdirectories, "i", "a",
#        "dead", "m" as below}.  A name's slot is blake2b(name, key=salt, 8
# bytes) little-endian, h; the map is bytes of 2**D (D its global depth), and
# map[h % 2**D] is the depth d of the bucket holding the name, stored under
# "fs:d:{<ino>}:<d>.<h % 2**d>" (absent = empty; the braces: one Redis slot for
# a directory's buckets) as {name: entry}.  A bucket of more than BUCKET
# entries splits in two by the next bit of h (extendible hashing): the two new
# buckets are written, then the head, then the old bucket removed, so a reader
# that finds a bucket gone reads the head again (fs/client.py).  A bucket left
# with its buddy (the bucket that differs in its deepest bit) holding MERGE
# entries or fewer between them is merged back into one of a bit less, and the
# map halved while no bucket is as deep as it (`merge`): the merged bucket and
# the head are written, then the halves removed, so a reader that finds a
# bucket gone reads the head again here too.  The old form of a directory, before
# buckets (until srw 2026-12), is one value {"e": {name: entry}, "i", "a",
# "dead", "m"}: it is read as it is, and moved into buckets by its first op
# that writes.  Entries:
#   {name: [ino, kind, mode, size, mtime, uid, gid, atime, ctime, extra]},
#         kind: f file, d directory, l symlink (extra: its target), p fifo,
#         c/b device (extra: rdev), s socket; an entry of the first five fields
#         alone is read as root's, atime and ctime its mtime (fs/shape.py)
#    "i": {iid: [name, entry, to_ino, to_name, replace_ino]}   renames out, half done
#    "a": {iid: err}                                            renames in, applied
#    "dead": bool,                                              removed (rmdir)
#    "m": [mode, uid, gid, atime, mtime, ctime]}   optional: the directory's own
#         attributes, once set or once its entries changed (before that, its
#         entry in the parent's).  An op on a directory carries "base" (those
#         six as the client knows them) to start "m" from, and "now".
# File contents live in chunks under "fs:c:{<ino>}:<n>" (fs/client.py), never
# moved by a rename.  This script never touches them: an op that removes or
# replaces a file answers "gone": [ino, size], and the client removes them.
#
# Hard links: an entry of 11 fields whose last is 1 is "linked": its
# attributes live in the inode object "fs:i:{<ino>}" (same hash tag as the
# chunks), [kind, mode, size, mtime, uid, gid, atime, ctime, extra, nlink],
# changed by the i* ops below exec'd with that key (so the inode's own lock
# serializes them).  Removing a linked entry answers "unref": ino, and the
# client then runs iref -1; the last reference removes the object and
# answers "gone".
#
# Rename across directories, S/name -> T/to_name (intent id `iid`, random):
#   1. take   on S: move the entry out of S's entries into S's intents, in one write.
#   2. apply  on T: if S no longer holds the intent (read, no lock), or T already
#      recorded iid, do nothing; else add the entry (or reject with an errno) and
#      record iid in T's applied set, in one write.
#   3. finish on S: drop the intent; if T rejected it, put the entry back.
#   4. forget on T: drop iid from T's applied set.
# Steps 2-4 are the recovery too: anyone who sees an intent in S (a reader, a
# later rename) runs them again.  Why the entry is never lost nor doubled: it is
# always in exactly one of S's entries, S's intents or T's entries.  Step 2 adds
# it to T at most once: while S holds the intent, T's applied record stops a
# second apply; once step 3 has dropped the intent, step 2 sees it gone in S.
# Step 4 only runs after step 3, so no apply can find neither.  Each step is
# one exec holding one lock, so opposite renames never deadlock.
import hashlib
import os

import msgpack

DIR = "fs:d:"
KIND, SIZE, MODE, MTIME, UID, GID, ATIME, CTIME = 1, 3, 2, 4, 5, 6, 7, 8
KINDS = ("f", "d", "l", "p", "c", "b", "s")
SETTABLE = (("size", SIZE), ("mode", MODE), ("mtime", MTIME), ("uid", UID), ("gid", GID),
            ("atime", ATIME), ("ctime", CTIME))
BUCKET = 128        # entries in a bucket before it splits (~60 KiB at most: names <= 255 B)
MERGE = BUCKET // 4  # entries two buddy buckets may hold together to be merged back
MAX_DEPTH = 16      # 65,536 buckets (8 million entries) before buckets grow past BUCKET
SALT = 8
# The most entries an old-form directory may have to be moved into buckets (in
# one exec, within the request's deadline: 200 entries take ~0.1 s here, and
# 10,000 (256 bucket writes) 1-2 s idle but over 5 s on a loaded machine); a
# larger one stays in the old form, written whole by each op as before.
MOVE_MAX = 5_000
HEAD = ("b", "k", "n", "s", "i", "a", "dead")


class Bad(Exception):
    """A stored value that is not what it should be: the exec answers EIO."""


def slot(salt, name):
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"), key=salt,
                                          digest_size=8).digest(), "little")


def bucket_key(ino, depth, prefix):
    return "%s{%s}:%d.%d" % (DIR, ino, depth, prefix)


def unpack(key):
    """The value under `key` decoded, None if absent; Bad if it does not decode."""
    try:
        raw = fs_store.read_data(key)
    except KeyError:
        return None
    try:
        return msgpack.unpackb(raw, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise Bad("%s does not decode: %s" % (key, (str(exc) or type(exc).__name__)[:80]))


class Dir:
    """A directory as this op sees it: its head, the buckets read so far, and
    what `save` writes (changed buckets, then the head, then removed buckets)."""

    def __init__(self, ino, head, old=False):
        self.ino, self.head, self.old = ino, head, old     # old: the old form, kept
        self.buckets, self.dirty, self.gone = {}, set(), set()

    def __getitem__(self, field):
        return self.head[field]

    def __setitem__(self, field, value):
        self.head[field] = value

    def __contains__(self, field):
        return field in self.head

    def where(self, name):
        """(depth, prefix) of the bucket for `name`."""
        h = slot(self.head["k"], name)
        depth = self.head["b"][h % len(self.head["b"])]
        return depth, h % (1 << depth)

    def bucket(self, where):
        if where not in self.buckets:
            b = unpack(bucket_key(self.ino, *where))
            if b is not None and not isinstance(b, dict):
                raise Bad("%s is not a map of entries" % bucket_key(self.ino, *where))
            self.buckets[where] = b or {}
        return self.buckets[where]

    def get(self, name):
        if self.old:
            return self.head["e"].get(name)
        return self.bucket(self.where(name)).get(name)

    def put(self, name, entry):
        if self.old:
            self.head["e"][name] = entry
            return
        where = self.where(name)
        b = self.bucket(where)
        old = b.get(name)
        self.count(old, -1)
        self.count(entry, 1)
        b[name] = entry
        self.dirty.add(where)
        if len(b) > BUCKET:
            self.split(where)

    def drop(self, name):
        if self.old:
            self.head["e"].pop(name, None)
            return
        where = self.where(name)
        self.count(self.bucket(where).pop(name, None), -1)
        self.dirty.add(where)
        self.merge(where)

    def count(self, entry, sign):
        if entry is not None:
            self.head["n"] = max(0, self.head["n"] + sign)
            if isinstance(entry, list) and entry[1:2] == ["d"]:
                self.head["s"] = max(0, self.head["s"] + sign)

    def split(self, where):
        """Split the bucket in two by the next bit of each name's slot, again
        while one half is over BUCKET (names that share their low bits)."""
        depth, prefix = where
        while depth < MAX_DEPTH:
            b = self.buckets.pop((depth, prefix))
            self.dirty.discard((depth, prefix))
            self.gone.add((depth, prefix))
            halves = ({}, {})
            for name, entry in b.items():
                halves[slot(self.head["k"], name) >> depth & 1][name] = entry
            if depth == len(self.head["b"]).bit_length() - 1:     # D grows
                self.head["b"] = self.head["b"] * 2
            m = bytearray(self.head["b"])
            for i in range(prefix, len(m), 1 << depth):
                m[i] = depth + 1
            self.head["b"] = bytes(m)
            for bit in (0, 1):
                half = (depth + 1, prefix | bit << depth)
                self.buckets[half] = halves[bit]
                self.dirty.add(half)
                self.gone.discard(half)
            bit = 0 if len(halves[0]) > BUCKET else 1 if len(halves[1]) > BUCKET else None
            if bit is None:
                return
            depth, prefix = depth + 1, prefix | bit << depth

    def merge(self, where):
        """Merge the bucket with its buddy (same depth, the other value of its
        deepest bit) while the two hold at most MERGE entries, and halve the map
        while no bucket is as deep as it: a directory emptied goes back to one
        bucket.  The halves are removed after the head is written (as a split's
        old bucket), so a reader with the old head still finds them, as changed
        by this op."""
        depth, prefix = where
        while depth > 0:
            bit = 1 << (depth - 1)
            buddy = (depth, prefix ^ bit)
            m = bytearray(self.head["b"])
            if m[buddy[1]] != depth:                    # split deeper: not now
                return
            try:
                halves = self.bucket(where), self.bucket(buddy)
            except Bad:                                 # readers say EIO for it
                return
            if len(halves[0]) + len(halves[1]) > MERGE:
                return
            merged = (depth - 1, prefix & (bit - 1))
            self.buckets[merged] = {**halves[0], **halves[1]}
            self.dirty.add(merged)
            self.gone.discard(merged)
            self.gone.update((where, buddy))
            for i in range(merged[1], len(m), bit):
                m[i] = depth - 1
            while len(m) > 1 and max(m) < len(m).bit_length() - 1:
                m = m[:len(m) // 2]
            self.head["b"] = bytes(m)
            where, (depth, prefix) = merged, merged

    def names(self):
        """Every entry's name (rmdir's check: it reads every bucket)."""
        if self.old:
            return list(self.head["e"])
        out = []
        m = self.head["b"]
        for i in range(len(m)):
            if i < 1 << m[i]:
                out.extend(self.bucket((m[i], i)))
        return out

    def save(self):
        for where in self.dirty:
            b = self.buckets[where]
            if b:
                fs_store.write_data(bucket_key(self.ino, *where), msgpack.packb(b))
            else:
                fs_store.remove(bucket_key(self.ino, *where))
        fs_store.write_data(DIR + self.ino, msgpack.packb(self.head))
        for where in self.gone:
            fs_store.remove(bucket_key(self.ino, *where))


def load(ino):
    head = unpack(DIR + ino)
    if head is None:
        return Dir(ino, {"b": b"\0", "k": os.urandom(SALT), "n": 0, "s": 0, "i": {}, "a": {},
                         "dead": False})
    if isinstance(head, dict) and "e" in head:
        return migrated(ino, head)
    if not (isinstance(head, dict) and len(head) == len(HEAD) + ("m" in head)
            and all(f in head for f in HEAD) and isinstance(head["i"], dict)
            and isinstance(head["a"], dict) and isinstance(head["dead"], bool)
            and isinstance(head["k"], bytes) and len(head["k"]) == SALT
            and isinstance(head["n"], int) and isinstance(head["s"], int)
            and head["n"] >= 0 <= head["s"]
            and isinstance(head["b"], bytes) and map_ok(head["b"])
            and (isinstance(head.get("m"), list) and len(head["m"]) == 6 or "m" not in head)):
        raise Bad("%s%s is not a directory head" % (DIR, ino))
    return Dir(ino, head)


def map_ok(m):
    """A bucket map: 2**D bytes (D <= MAX_DEPTH), none deeper than D."""
    depth = len(m).bit_length() - 1
    return 0 < len(m) == 1 << depth and depth <= MAX_DEPTH and max(m) <= depth


def migrated(ino, old):
    """A directory of the old form, its entries moved into buckets (written by
    the op's save, if it saves): each name hashed once into buckets of a depth
    that holds them half full (fs/shape.py `layout` does the same)."""
    if not (len(old) == 4 + ("m" in old) and isinstance(old.get("e"), dict)
            and isinstance(old.get("i"), dict) and isinstance(old.get("a"), dict)
            and isinstance(old.get("dead"), bool)
            and (isinstance(old.get("m"), list) and len(old["m"]) == 6 or "m" not in old)):
        raise Bad("%s%s is not a directory object" % (DIR, ino))
    entries = old["e"]
    if len(entries) > MOVE_MAX:
        return Dir(ino, old, old=True)
    depth = 0                     # buckets half full on average: one in ~10**9 splits
    while len(entries) > (BUCKET // 2) << depth and depth < MAX_DEPTH:
        depth += 1
    d = Dir(ino, {"b": bytes([depth]) * (1 << depth), "k": os.urandom(SALT), "n": 0, "s": 0,
                  "i": old["i"], "a": old["a"], "dead": old["dead"]})
    if "m" in old:
        d.head["m"] = old["m"]
    for prefix in range(1 << depth):
        d.buckets[(depth, prefix)] = {}
        d.dirty.add((depth, prefix))
    for name, entry in entries.items():
        if isinstance(name, str):     # names no directory can hold: readers skip them
            d.buckets[(depth, slot(d.head["k"], name) % (1 << depth))][name] = entry
            d.count(entry, 1)
    for where in [w for w, b in d.buckets.items() if len(b) > BUCKET]:
        d.split(where)
    return d


def own(d, r):
    """The directory's own attributes, started from the request's base; None
    if it has none yet and the request gave no base."""
    if "m" not in d:
        base = r.get("base")
        if not (isinstance(base, list) and len(base) == 6):
            return None
        d["m"] = list(base)
    return d["m"]


def changed(d, r):
    """Its entries changed: the directory's mtime and ctime are now."""
    m, now = own(d, r), r.get("now")
    if m is not None and isinstance(now, (int, float)):
        m[4] = m[5] = now


def checked(entry, what):
    """`entry` if it looks like [ino, kind, mode, size, mtime, ...] (the fields
    this script reads), else Bad; one of five fields is given the other five."""
    if not (isinstance(entry, list) and len(entry) in (5, 10, 11) and isinstance(entry[0], str)
            and entry[KIND] in KINDS):
        raise Bad("%s is not [ino, kind, mode, size, mtime, ...]" % what)
    if len(entry) == 5:
        entry.extend([0, 0, entry[MTIME], entry[MTIME], 0])
    return entry


def entry_at(d, name):
    """The entry under `name`, None when there is none."""
    old = d.get(name)
    return None if old is None else checked(old, "entry %r" % name[:40])


def intent_at(d, iid):
    """The intent `iid` ([name, entry, to, to_name, replace]), None when there is none."""
    intent = d["i"].get(iid)
    if intent is None:
        return None
    if not (isinstance(intent, list) and len(intent) == 5 and isinstance(intent[0], str)
            and isinstance(intent[3], str)):
        raise Bad("intent %r is not [name, entry, to, to_name, replace]" % iid[:40])
    checked(intent[1], "intent %r's entry" % iid[:40])
    return intent


def op_dirattr(ino, d, r):
    """chmod, chown, utimens of the directory itself."""
    m = own(d, r)
    if m is None:
        return {"err": "EINVAL"}
    for field, index in (("mode", 0), ("uid", 1), ("gid", 2), ("atime", 3), ("mtime", 4),
                         ("ctime", 5)):
        if r.get(field) is not None:
            m[index] = r[field]
    d.save()
    return {"err": "", "m": m}


def conflict(d, to_name, entry, replace_ino):
    """The errno a move of `entry` onto `to_name` gets, "" when it may go."""
    old = entry_at(d, to_name)
    if old is None or old[0] == entry[0]:
        return ""
    if old[KIND] == "d":
        if entry[KIND] != "d":
            return "EISDIR"
        return "" if old[0] == replace_ino else "ENOTEMPTY"
    return "ENOTDIR" if entry[KIND] == "d" else ""


def gone(entry):
    """[ino, size] of a file whose contents the client is to remove (None for
    an entry of another kind: it has no contents)."""
    if entry[KIND] != "f":
        return None
    size = entry[SIZE]
    return [entry[0], size if isinstance(size, int) and size >= 0 else 0]


def linked(entry):
    return len(entry) == 11 and entry[10] == 1


def released(entry):
    """What the reply says of an entry no name holds any more: its contents
    to remove, or (linked) its inode to unreference."""
    if entry is None:
        return {}
    if linked(entry):
        return {"unref": entry[0]}
    return {"gone": gone(entry)}


def put(d, to_name, entry, r):
    """Place `entry` at `to_name` (a moved entry's ctime is now); the reply's
    "gone" for a file it replaces."""
    old = entry_at(d, to_name)
    if isinstance(r.get("now"), (int, float)) and entry[KIND] != "d":
        checked(entry, "the moved entry")[CTIME] = r["now"]
    d.put(to_name, entry)
    return released(old) if old is not None and old[0] != entry[0] else {}


def op_make(ino, d, r):
    """mkdir, mknod, mkfifo, symlink: a new name, EEXIST if taken."""
    if d["dead"]:
        return {"err": "ENOENT"}
    if d.get(r["name"]) is not None:
        return {"err": "EEXIST"}
    d.put(r["name"], r["entry"])
    changed(d, r)
    d.save()
    return {"err": ""}


op_mkdir = op_make


def op_create(ino, d, r):
    if d["dead"]:
        return {"err": "ENOENT"}
    old = entry_at(d, r["name"])
    if old is not None:
        if r["excl"]:
            return {"err": "EEXIST"}
        return {"err": "EISDIR"} if old[KIND] == "d" else {"err": "", "entry": old}
    d.put(r["name"], r["entry"])
    changed(d, r)
    d.save()
    return {"err": "", "entry": r["entry"]}


def op_unlink(ino, d, r):
    old = entry_at(d, r["name"])
    if old is None:
        return {"err": "ENOENT"}
    if old[KIND] == "d":
        return {"err": "EISDIR"}
    d.drop(r["name"])
    changed(d, r)
    d.save()
    return dict(released(old), err="")


def op_kill(ino, d, r):
    """rmdir, step 1, on the directory itself: refuse new entries from now on."""
    if d["i"] or d.names():
        return {"err": "ENOTEMPTY"}
    if not d["dead"]:
        d["dead"] = True
        d.save()
    return {"err": ""}


def same_entry(d, r):
    """The entry at r["name"] if it is still r["ino"] (not replaced meanwhile)."""
    old = entry_at(d, r["name"])
    return old if old is not None and old[0] == r["ino"] else None


def op_drop(ino, d, r):
    """rmdir, step 2, on the parent: forget the (dead) directory's entry."""
    if same_entry(d, r) is None:
        return {"err": "ENOENT"}
    d.drop(r["name"])
    changed(d, r)
    d.save()
    return {"err": ""}


def op_setattr(ino, d, r):
    old = same_entry(d, r)
    if old is None:
        return {"err": "ENOENT"}
    for field, index in SETTABLE:
        if r.get(field) is not None:
            old[index] = r[field]
    if r.get("linked") and not linked(old):
        old[10:] = [1]
    d.put(r["name"], old)
    d.save()
    return {"err": "", "entry": old}


def op_rename(ino, d, r):
    """Within one directory: one write, atomic."""
    entry = entry_at(d, r["name"])
    if entry is None:
        return {"err": "ENOENT"}
    err = conflict(d, r["to_name"], entry, r.get("replace_ino"))
    target = entry_at(d, r["to_name"])
    if err or target is not None and target[0] == entry[0]:
        return {"err": err}         # onto itself, or another name of it: nothing to do
    d.drop(r["name"])
    replaced = put(d, r["to_name"], entry, r)
    changed(d, r)
    d.save()
    return dict(replaced, err="")


def op_take(ino, d, r):
    entry = entry_at(d, r["name"])
    if entry is None:
        return {"err": "ENOENT"}
    d.drop(r["name"])
    d["i"][r["iid"]] = [r["name"], entry, r["to"], r["to_name"], r.get("replace_ino")]
    changed(d, r)
    d.save()
    return {"err": ""}


def op_apply(ino, d, r):
    iid = r["iid"]
    if iid in d["a"]:
        return {"err": "", "result": d["a"][iid]}
    intent = intent_at(load(r["src"]), iid)
    if intent is None:                      # finished and dropped already
        return {"err": "", "result": None}
    name, entry, _to, to_name, replace_ino = intent
    err = "ENOENT" if d["dead"] else conflict(d, to_name, entry, replace_ino)
    replaced = {} if err else put(d, to_name, entry, r)
    if not err:
        changed(d, r)
    d["a"][iid] = err
    d.save()
    return dict(replaced, err="", result=err)


def op_finish(ino, d, r):
    intent = intent_at(d, r["iid"])
    if intent is None:
        return {"err": ""}
    del d["i"][r["iid"]]
    if r["rejected"]:                       # put it back, under another name if taken
        name, entry = intent[0], intent[1]
        if d.get(name) is not None:
            name = "%s.srw-restored-%s" % (name, r["iid"][:8])
        d.put(name, entry)
    d.save()
    return {"err": ""}


def op_forget(ino, d, r):
    if r["iid"] in d["a"]:
        del d["a"][r["iid"]]
        d.save()
    return {"err": ""}


# Inodes of hard-linked entries -----------------------------------------------------

INODE = "fs:i:"
NLINK = 9
NODE_FIELDS = (("mode", 1), ("size", 2), ("mtime", 3), ("uid", 4), ("gid", 5),
               ("atime", 6), ("ctime", 7))


def inode_key(ino):
    return "%s{%s}" % (INODE, ino)


def load_node(ino):
    try:
        raw = fs_store.read_data(inode_key(ino))
    except KeyError:
        return None
    try:
        node = msgpack.unpackb(raw, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise Bad("%s does not decode: %s" % (inode_key(ino), (str(exc) or type(exc).__name__)[:80]))
    if not (isinstance(node, list) and len(node) == 10 and isinstance(node[NLINK], int)
            and isinstance(node[2], int)):
        raise Bad("%s is not an inode" % inode_key(ino))
    return node


def iop_iref(ino, r):
    """A name more (+1, starting from "base") or fewer (-1) for the inode."""
    node = load_node(ino)
    if node is None:
        node = r.get("base")
        if r.get("delta") != 1 or not (isinstance(node, list) and len(node) == 10):
            return {"err": "ENOENT"}
    node[NLINK] += 1 if r["delta"] == 1 else -1
    if isinstance(r.get("now"), (int, float)):
        node[7] = r["now"]                  # a link or unlink changes its ctime
    if node[NLINK] <= 0:
        fs_store.remove(inode_key(ino))
        return {"err": "", "gone": [ino, max(node[2], 0)] if node[0] == "f" else None}
    fs_store.write_data(inode_key(ino), msgpack.packb(node))
    return {"err": "", "node": node}


def iop_iset(ino, r):
    node = load_node(ino)
    if node is None:
        return {"err": "ENOENT"}
    for field, index in NODE_FIELDS:
        if r.get(field) is not None:
            node[index] = r[field]
    fs_store.write_data(inode_key(ino), msgpack.packb(node))
    return {"err": "", "node": node}


OPS = {name[3:]: f for name, f in list(globals().items()) if name.startswith("op_")}
IOPS = {name[4:]: f for name, f in list(globals().items()) if name.startswith("iop_")}


def answer(request):
    op = request.get("op")
    try:
        if op in IOPS:
            return IOPS[op](request["ino"], request)
        if op not in OPS:
            return {"err": "EINVAL"}
        return OPS[op](request["dir"], load(request["dir"]), request)
    except Bad as exc:
        where = inode_key(request["ino"]) if op in IOPS else DIR + request["dir"]
        return {"err": "EIO", "why": "%s on %s: %s" % (op, where, exc)}


__return_data = msgpack.packb(answer(msgpack.unpackb(__input_binary_data_tuple[0], raw=False)))
