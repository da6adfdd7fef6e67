"""Each `srw serve`'s side of pushed scripts (srw/pushed.py): the sync.

    every SYNC_EVERY s, when the stamp moved (and on "sync"):
      the store ──► the map(s) in our nodes' places (storage/engine.py; lmdb: their
                    own stores, and every CATCH_UP_EVERY s the other nodes' too: a
                    newer one is copied into ours; redis: the one key)
                ──► refused, logged once: an older sequence than the one taken, the
                    same sequence with another content, no map, no seal
                ──► the newest map left ──► history dir (pushed.sync_dir)
                                        ──► data_dir/pushed.map, then data_dir/pushed.seq
      a refused copy in the store ──► the map we took put back over it (compare-and-set)

What a node took lives in each of its data_dirs: STATE, "SEQUENCE SHA256\\n",
read at start as hostile input (bounded, one number, one hash; anything else
is ignored with a warning), and KEPT, the sealed map itself, so the node can
put it back when a script replays an older map or removes it (a pusher
refuses to build on such a map: its next push works once the node has).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from core.config import Config, NodeSettings
from storage.engine import UNREADABLE, Place
from storage.errors import StorageError, StorageUnavailable

from .pushed import (CATCH_UP_EVERY, KEY, MAX_MAP, MAX_SEQ, SYNC_EVERY, PushConflict,
                     PushError, ScriptStore, Stored, newest, open_map, refusal, replace_file,
                     sync_dir)

log = logging.getLogger("srw.pushed")

STATE = "pushed.seq"    # "SEQUENCE SHA256\n" of the map the node took
KEPT = "pushed.map"     # that map, sealed as stored
MAX_STATE = 128         # bytes of STATE read at most


def read_state(data_dir: str | Path) -> tuple[int, str]:
    """(sequence, sha256) of the map this node took last, (0, "") when none."""
    path = Path(data_dir) / STATE
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_STATE + 1)
    except FileNotFoundError:
        return 0, ""
    except OSError as exc:
        log.warning("pushed scripts: cannot read %s (%s); ignored", path, exc)
        return 0, ""
    words = text.split() if len(text) <= MAX_STATE else []
    if len(words) == 2 and words[0].isdigit() and len(words[0]) <= 19 and \
            int(words[0]) <= MAX_SEQ and len(words[1]) == 64 and \
            all(c in b"0123456789abcdef" for c in words[1]):
        return int(words[0]), words[1].decode()
    log.warning("pushed scripts: %s is not \"SEQUENCE SHA256\"; ignored", path)
    return 0, ""


@dataclass(frozen=True, slots=True)
class Copy:
    """One copy of the map as a sync found it."""
    source: str                   # its place's name (a node's, "redis"), or "catch-up"
    place: Place | None           # where it is (None: a catch-up, copied into ours)
    raw: object                   # the value read (None: no map; UNREADABLE)
    stored: Stored | None         # its map, when sealed and sound
    problem: str = ""             # why it is no map at all (unsealed, unreadable)
    readable: bool = True         # whether `raw` is what the store holds


class NodeSync:
    """What `srw serve` runs for its nodes: read the map from the store, write it
    into the history dir, and say which pools must roll (python.init changed)."""

    def __init__(self, config: Config, nodes: list[NodeSettings], curve=None):
        self.config, self.nodes = config, nodes
        self.own: list[Place] = []     # where our nodes keep the map
        self.others: list[Place] = []  # where the other nodes keep theirs (catch-up)
        try:
            self.store: ScriptStore | None = ScriptStore(config, curve, timeout=0.5)
            self.off = ""
            self.own = self.store.places_of(nodes)
            self.others = [place for place in self.store.places if place not in self.own]
        except PushError as exc:  # no secret: nothing pushed can be trusted, so none is taken
            self.store, self.off = None, str(exc)
            log.info("pushed scripts are off: %s", exc)
        self.next = 0.0          # time.monotonic() of the next sync
        self.next_catch_up = 0.0  # lmdb: of the next look at the other nodes' copies
        self._last_error = ""
        self._synced: tuple = ()  # the stamps the last sync read
        # (sequence, sha256) of the map taken last: the highest any of our nodes kept.
        self.taken = max((read_state(n.data_dir) for n in nodes), default=(0, ""))
        self.notes: list[str] = []  # what the last sync refused or missed
        self._noted: set[str] = set()  # logged once each, while they last
        self._values: dict[str, bytes] = {}  # stamp -> sealed value, of this sync's reads

    def sync(self, catch_up: bool = False, if_changed: bool = False) -> list[str]:
        """One sync now; the names that changed.  Raises StorageError, PushError,
        OSError (each logged once by `poll`).  With `if_changed`, nothing is read
        but the stamps while they have not moved.  lmdb, with `catch_up`: also
        read the other nodes' copies, and keep a newer one in our own stores (we
        missed a push while we were down; with one shared place there are none)."""
        if self.store is None:
            raise PushError(self.off)
        notes: list[str] = []
        stamps = tuple(self._stamp(place, notes) for place in self.own)
        if if_changed and not catch_up and stamps == self._synced:
            return []
        copies = self._copies(catch_up)
        usable, refused = [], []
        for copy in copies:
            why = copy.problem or self._refusal(copy.stored)
            (refused if why else usable).append((copy, why))
        best = newest([copy.stored for copy, _ in usable if copy.stored is not None])
        changed = [] if best is None else self._take(best)
        self._note(notes + [f"{copy.source}: {why}{self._put_back(copy)}"
                            for copy, why in refused])
        self._last_error, self._synced = "", stamps
        return changed

    def _stamp(self, place: Place, notes: list[str]) -> bytes:
        """The stamp, or what stands for one a script spoiled (it only says when to
        read the map; the put-back mends it)."""
        try:
            return self.store.stamp(place)
        except StorageUnavailable:
            raise
        except StorageError as exc:
            notes.append(f"{place.name}: {exc}")
            return b"?" + str(exc).encode()

    def _refusal(self, stored: Stored | None) -> str:
        if stored is None:
            return (f"no map under {KEY} (removed by a script or a client?); this node "
                    f"keeps sequence {self.taken[0]}") if self.taken[0] else ""
        return refusal(stored, *self.taken)

    def _take(self, stored: Stored) -> list[str]:
        changed = sync_dir(self.config.pool.history_dir, stored)
        for name in changed:
            log.info("pushed script %s: version %d (sha256 %s, sequence %d) now in %s", name,
                     stored.scripts[name].version, stored.scripts[name].sha256[:12],
                     stored.seq, self.config.pool.history_dir)
        if (stored.seq, stored.stamp) != self.taken:  # after the files: a crash redoes them
            value = self._values.get(stored.stamp)  # the sealed bytes this sync read
            for node in self.nodes:
                if value is not None:
                    replace_file(Path(node.data_dir) / KEPT, value)
                replace_file(Path(node.data_dir) / STATE, f"{stored.seq} {stored.stamp}\n".encode())
            self.taken = (stored.seq, stored.stamp)
        return changed

    def _put_back(self, copy: Copy) -> str:
        """Over a refused copy in our store, the map we took; what happened."""
        if not (self.taken[0] and copy.place is not None):
            return ""
        kept = self._kept()
        if kept is None:
            return f"; no copy of sequence {self.taken[0]} in {KEPT} to put back"
        try:
            return "; " + self.store.put_back(copy.place, kept, copy.raw)
        except (StorageError, PushError) as exc:
            return f"; not put back: {exc}"

    def _kept(self) -> bytes | None:
        """The sealed map we took, from a data_dir (read as hostile: bounded, its
        seal and its stamp checked)."""
        for node in self.nodes:
            try:
                with open(Path(node.data_dir) / KEPT, "rb") as f:
                    value = f.read(MAX_MAP + 1)
                if open_map(value, self.store.secret).stamp == self.taken[1]:
                    return value
            except (OSError, PushError):
                continue
        return None

    def _note(self, notes: list[str]) -> None:
        for note in notes:
            if note not in self._noted:
                log.warning("pushed scripts: %s", note)
        self.notes, self._noted = notes, set(notes)

    def _copy(self, source: str, place: Place) -> Copy:
        """One place's copy; raises StorageUnavailable."""
        try:
            raw = self.store.read_raw(place)
        except StorageUnavailable:
            raise
        except StorageError as exc:  # e.g. redis: a list where the map should be
            return Copy(source, place, UNREADABLE, None, str(exc), readable=False)
        try:
            stored = None if raw is None else open_map(raw, self.store.secret)
        except PushError as exc:  # e.g. not sealed: said, and left out
            return Copy(source, place, raw, None, str(exc))
        if stored is not None:
            self._values[stored.stamp] = raw
        return Copy(source, place, raw, stored)

    def _copies(self, catch_up: bool) -> list[Copy]:
        self._values = {}
        copies, down = [], []
        for place in self.own:
            try:
                copies.append(self._copy(place.name, place))
            except StorageUnavailable as exc:
                down.append(f"{place.name}: {exc}")
        if not copies and down:
            raise StorageUnavailable("; ".join(down))
        if catch_up:
            copies += self._catch_up(copies)
        return copies

    def _catch_up(self, own: list[Copy]) -> list[Copy]:
        """A newer map than ours in another node's place, which we may take, copied
        into our places (we missed a push while we were down)."""
        mine = newest([c.stored for c in own if c.stored is not None])
        best = None
        for place in self.others:
            try:
                copy = self._copy("catch-up", place)
            except StorageError:
                continue
            if copy.stored is not None and not self._refusal(copy.stored) and \
                    (best is None or (copy.stored.seq, copy.stored.stamp) >
                     (best.stored.seq, best.stored.stamp)):
                best = copy
        if best is None or (mine is not None and best.stored.seq <= mine.seq):
            return []
        log.info("pushed scripts: a newer copy (sequence %d) on another node; keeping it "
                 "here", best.stored.seq)
        for copy in own:
            if not copy.readable:
                continue
            try:
                if error := self.store.write_if(copy.place, best.raw, copy.raw):
                    log.warning("pushed scripts: %s", error)
            except PushConflict as exc:  # a push came meanwhile: the next sync sees it
                log.info("pushed scripts: %s", exc)
        return [Copy("catch-up", None, best.raw, best.stored)]

    def poll(self, now: float) -> list[str]:
        """Sync when due; errors are logged (once while they repeat), never raised."""
        if now < self.next or self.store is None:
            return []
        self.next = now + SYNC_EVERY
        catch_up = now >= self.next_catch_up
        if catch_up:
            self.next_catch_up = now + CATCH_UP_EVERY
        try:
            return self.sync(catch_up, if_changed=True)
        except (StorageError, PushError, OSError) as exc:
            if str(exc) != self._last_error:
                log.warning("script sync: %s", exc)
                self._last_error = str(exc)
            return []
        except Exception as exc:  # a bug here, or data we did not foresee: serve lives on
            if str(exc) != self._last_error:
                log.exception("script sync failed")
                self._last_error = str(exc)
            return []

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
