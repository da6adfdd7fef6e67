"""redis-cluster mode: one srw node's index of the slots its Redis node serves.

    own Redis node ──CLUSTER SHARDS (every MAP_EVERY)──► owned slots
         │                 gained: rebuild from the slot's index hash, then ready
         │                 lost:   its rows dropped, no longer ready
         ├──PUBLISH srw:index <slot> (a hint) ─┐
         └──EXISTS of every ready slot's log ──┴► tail: XRANGE the logs, read each
                 (every SWEEP_EVERY: a missed hint)   key and its lang, FTS5 rows in
                                                      step, XDEL what was done

A thread of the node's search front (storage/search_node.py), with the index's
one writer connection; searches read it from their own threads.  ``ready`` is
the set of slots whose rows agree with Redis as of the last rebuild or tail:
the front says which (a search's "slots"), and a client that does not see
every slot covered marks its results partial.

What it reads was written by anyone with write rights (storage/redis_index.py),
so every read is bounded: a log or hash larger than MAX_STRUCTURE bytes
(MEMORY USAGE) is not read (a log is dropped and its slot rebuilt; a hash
leaves its slot unindexed, logged, and is measured again after REFUSED_FOR),
keys longer than MAX_KEY are skipped, values are read up to
node.max_index_bytes (GETRANGE), READ_BATCH at a time, and what was read is
committed every PENDING_BYTES of text; a lang that is not configured means
"by script", and a hint is a slot number or nothing.  The rows put are always the key's value as Redis holds
it, so a script can make the index hold no text it could not store itself.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time

from redis import Redis
from redis import exceptions as rx
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from core import redis_auth
from core.config import Config, NodeSettings

from . import redis_index as ix
from .fulltext import FullText
from .protocol import MAX_LANG
from .router import read_slot_map, split_address

log = logging.getLogger("srw.storage.index")

MAP_EVERY = 0.5          # s between reads of the slot map (our own Redis node's)
SWEEP_EVERY = 5.0        # s between sweeps of every ready slot's log (a hint may be lost)
HINT_WAIT = 0.1          # s a turn waits for hints
MAX_HINTS = 10_000       # hints taken per turn
REBUILD_BATCH = 256      # slots rebuilt at once, then ready
TAIL_BATCH = 1000        # log entries read per slot per turn
TURN_DOCS = 5000         # documents read and indexed per turn
READ_BATCH = 64          # keys read per pipeline (each value up to max_index_bytes)
PENDING_BYTES = 32 * 1024 * 1024   # of text held before it is committed
REFUSED_FOR = 60.0       # s before an oversized index hash is measured again
MAX_KEY = 4096           # bytes of a key indexed; longer ones are skipped
MAX_STRUCTURE = 256 * 1024 * 1024   # bytes of a slot's hash or log read at most
DOWN_AFTER = 3           # slot-map reads failed in a row before the index is let go
MAP_TIMEOUT = 2.0        # s a slot-map read may take (a loaded node is no dead one)
COMMAND_TIMEOUT = 5.0


class SlotIndexer(threading.Thread):
    def __init__(self, config: Config, node: NodeSettings, fulltext: FullText):
        super().__init__(name=f"index-{node.name}", daemon=True)
        self.node, self.fulltext = node, fulltext
        self.auth = redis_auth.credentials(config)
        self.ready: frozenset[int] = frozenset()   # read by the front's loop
        self.documents = 0   # rows in the index as of the last turn (the front's STAT)
        self.stopping = threading.Event()
        self._dirty: set[int] = set()
        self._conn: Redis | None = None
        self._pubsub = None
        self._map_at = self._swept_at = -float("inf")
        self._failures = 0
        self._refused: dict[int, float] = {}   # slot -> when its hash is tried again

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.turn()
            except (rx.RedisError, OSError, KeyError, TypeError, StopIteration,
                    ValueError) as exc:   # what read_slot_map and redis-py raise
                self._lost_redis(exc)
                self.stopping.wait(MAP_EVERY)
            except Exception:   # a bug or a broken index file: index everything again
                log.exception("index %s: indexing failed; every slot is indexed again",
                              self.node.name)
                self.ready = frozenset()
                self._close()
                self.stopping.wait(MAP_EVERY)

    def stop(self) -> None:
        self.stopping.set()
        self.join(10.0)
        self._close()

    # One turn --------------------------------------------------------------------

    def turn(self) -> None:
        now = time.monotonic()
        if now - self._map_at >= MAP_EVERY:
            self._map_at = now
            self._follow_slots()
        self._dirty |= self._hints()
        if now - self._swept_at >= SWEEP_EVERY:
            self._swept_at = now
            self._dirty |= self._sweep()
        dirty, self._dirty = self._dirty & self.ready, set()
        if dirty:
            self._tail(sorted(dirty))
        if dirty or now == self._map_at:
            self.documents = self.fulltext.count()  # the index's connection is this thread's

    def _follow_slots(self) -> None:
        owned = {slot for slot, master in
                 enumerate(read_slot_map(self.node.redis, self.auth, MAP_TIMEOUT).owner)
                 if master == self.node.redis}
        self._failures = 0
        lost = self.ready - owned
        if lost:
            self.fulltext.apply([], [], versions=lost)
            self.ready -= lost
            log.info("index %s: %d slots gone to another master, their rows dropped",
                     self.node.name, len(lost))
        now = time.monotonic()
        gained = sorted(s for s in owned - self.ready if self._refused.get(s, 0) <= now)
        for start in range(0, len(gained), REBUILD_BATCH):
            self._rebuild(gained[start:start + REBUILD_BATCH])
        if gained:
            log.info("index %s: took %d slots, %d of them indexed from Redis; %d documents "
                     "in the index", self.node.name, len(gained),
                     len(self.ready.intersection(gained)), self.fulltext.count())

    def _lost_redis(self, exc: Exception) -> None:
        """Our Redis node is unreachable: after DOWN_AFTER turns, nothing we hold
        can be said to agree with it (its slots may have failed over)."""
        self._failures += 1
        self._close()
        if self._failures == DOWN_AFTER and self.ready:
            log.warning("index %s: Redis %s unreachable (%s): the index of its %d slots "
                        "is dropped until it answers again", self.node.name, self.node.redis,
                        exc, len(self.ready))
            self.fulltext.apply([], [], versions=self.ready)
            self.ready = frozenset()

    # Connections -----------------------------------------------------------------

    @property
    def conn(self) -> Redis:
        if self._conn is None:
            host, port = split_address(self.node.redis)
            self._conn = Redis(host, port, username=self.auth[0], password=self.auth[1],
                               socket_timeout=COMMAND_TIMEOUT, socket_connect_timeout=1.0,
                               retry=Retry(NoBackoff(), 0))
        return self._conn

    def _hints(self) -> set[int]:
        """Slots named by PUBLISH srw:index since the last turn (waits HINT_WAIT)."""
        if self._pubsub is None:
            self._pubsub = self.conn.pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(ix.CHANNEL)
            self._swept_at = -float("inf")  # hints before the subscription: sweep
        slots = set()
        wait = HINT_WAIT
        for _ in range(MAX_HINTS):
            message = self._pubsub.get_message(timeout=wait)
            if message is None:
                break
            wait = 0.0
            data = message.get("data")
            if isinstance(data, bytes) and data.isdigit() and len(data) <= 5 and \
                    int(data) < ix.SLOTS:
                slots.add(int(data))
        return slots

    def _close(self) -> None:
        for thing in (self._pubsub, self._conn):
            if thing is not None:
                try:
                    thing.close()
                except (rx.RedisError, OSError):
                    pass
        self._pubsub = self._conn = None

    # Reading Redis, bounded --------------------------------------------------------

    def _sweep(self) -> set[int]:
        """Ready slots whose log is not empty."""
        slots = sorted(self.ready)
        pipe = self.conn.pipeline(transaction=False)
        for slot in slots:
            pipe.exists(ix.log_key(slot))
        return {slot for slot, there in zip(slots, pipe.execute(raise_on_error=False))
                if there is True or there == 1}

    def _sizes(self, keys: list[bytes]) -> list[int | None]:
        """MEMORY USAGE of each key (0: none; None: Redis refused, e.g. MOVED)."""
        pipe = self.conn.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
        return [None if isinstance(r, Exception) else int(r or 0)  # nil: no such key
                for r in pipe.execute(raise_on_error=False)]

    def _read(self, slot: int, keys: list[bytes], pending: "_Pending") -> None:
        """`keys` of `slot` as Redis holds them now, into `pending` (which commits
        whenever it holds PENDING_BYTES of text: a script may index many large
        values).  A lang is read only when it is short enough to be one."""
        index = ix.index_key(slot)
        for start in range(0, len(keys), READ_BATCH):
            chunk = keys[start:start + READ_BATCH]
            pipe = self.conn.pipeline(transaction=False)
            for key in chunk:
                pipe.hexists(index, key)
                pipe.hstrlen(index, key)
                pipe.getrange(key, 0, self.node.max_index_bytes - 1)
            replies = pipe.execute(raise_on_error=False)
            langs = self._langs(index, chunk, replies[1::3])
            for key, indexed, lang, value in zip(chunk, replies[::3], langs, replies[2::3]):
                key_id = hashlib.sha512(key).digest()
                if indexed is not True and indexed != 1 or not isinstance(value, bytes) or \
                        not value:
                    pending.drop(key_id)   # not indexed (any more), gone, or not a string
                    continue
                pending.put((key_id, key.decode(errors="replace"), slot, ix.text_of(value),
                             lang))

    def _langs(self, index: bytes, keys: list[bytes], sizes: list) -> list[str]:
        """The lang of each key from the slot's hash; one longer than MAX_LANG is
        not read ("": by script, as one not configured is in FullText)."""
        wanted = [i for i, size in enumerate(sizes) if isinstance(size, int) and
                  0 < size <= MAX_LANG]
        langs = [""] * len(keys)
        if wanted:
            pipe = self.conn.pipeline(transaction=False)
            for i in wanted:
                pipe.hget(index, keys[i])
            for i, lang in zip(wanted, pipe.execute(raise_on_error=False)):
                if isinstance(lang, bytes):
                    langs[i] = lang[:MAX_LANG].decode(errors="replace")
        return langs

    # Rebuild and tail --------------------------------------------------------------

    def _rebuild(self, slots: list[int]) -> None:
        """Index `slots` again from their hashes, not ready meanwhile: their old rows
        go first, the logs too (what changes after is logged anew)."""
        self.ready -= set(slots)
        pipe = self.conn.pipeline(transaction=False)
        for slot in slots:
            pipe.delete(ix.log_key(slot))
        pipe.execute(raise_on_error=False)
        self.fulltext.apply([], [], versions=slots)
        sizes = self._sizes([ix.index_key(s) for s in slots])
        pending, done = _Pending(self.fulltext), []
        for slot, size in zip(slots, sizes):
            if size is None:
                continue   # not ours after all (MOVED): the next map read tells
            if size > MAX_STRUCTURE:
                log.warning("index %s: slot %d's index hash holds %d bytes, more than %d: "
                            "not indexed; tried again in %.0f s", self.node.name, slot, size,
                            MAX_STRUCTURE, REFUSED_FOR)
                self._refused[slot] = time.monotonic() + REFUSED_FOR
                continue
            for keys in self._indexed_keys(slot) if size else ():
                self._read(slot, keys, pending)
            done.append(slot)
        pending.commit()
        self.ready |= set(done)

    def _indexed_keys(self, slot: int):
        """The slot's indexed keys (its hash's fields), READ_BATCH at a time."""
        keys = []
        try:
            for key, _ in self.conn.hscan_iter(ix.index_key(slot), count=READ_BATCH):
                if len(key) <= MAX_KEY and key_slot(key) == slot:
                    keys.append(key)
                if len(keys) >= READ_BATCH:
                    yield keys
                    keys = []
        except rx.ResponseError as exc:   # WRONGTYPE: a script made it something else
            log.warning("index %s: slot %d's index hash: %s", self.node.name, slot, exc)
        yield keys

    def _tail(self, slots: list[int]) -> None:
        """The slots' logs since they were last read, each key as Redis holds it
        now: one pipeline per step for every slot, one FTS5 commit for all.  A
        log is measured before it is read."""
        logs = [ix.log_key(slot) for slot in slots]
        sizes = self._sizes(logs)   # None: not ours (MOVED: the next map read tells)
        spoiled = [slot for slot, size in zip(slots, sizes) if size and size > MAX_STRUCTURE]
        todo = [(slot, logged) for slot, logged, size in zip(slots, logs, sizes)
                if size and size <= MAX_STRUCTURE]
        pipe = self.conn.pipeline(transaction=False)
        for _, logged in todo:
            pipe.xrange(logged, count=TAIL_BATCH)
            pipe.xlen(logged)
        replies = pipe.execute(raise_on_error=False)
        pending, read = _Pending(self.fulltext), []
        for (slot, logged), entries, length in zip(todo, replies[::2], replies[1::2]):
            if pending.documents >= TURN_DOCS:
                self._dirty.add(slot)   # enough for one turn
                continue
            if not isinstance(length, int) or not isinstance(entries, list) or \
                    length >= ix.LOG_MAX * 9 // 10:
                spoiled.append(slot)   # a script's, or cut by MAXLEN: the hash is the truth
                continue
            keys, ids = self._logged_keys(slot, entries)
            self._read(slot, keys, pending)
            read.append((logged, ids))
            if length > len(ids):
                self._dirty.add(slot)
        pending.commit()   # before the log entries go
        pipe = self.conn.pipeline(transaction=False)
        for logged, ids in read:
            if ids:
                pipe.xdel(logged, *ids)
        pipe.execute(raise_on_error=False)
        if spoiled:
            self._rebuild(spoiled)

    @staticmethod
    def _logged_keys(slot: int, entries: list) -> tuple[list[bytes], list]:
        """(keys of `slot` named by the log entries, once each; every entry's id)."""
        keys, ids = [], []
        for entry in entries:
            entry_id, fields = entry if isinstance(entry, (list, tuple)) and len(entry) == 2 \
                else (None, None)
            key = fields.get(ix.LOG_FIELD) if isinstance(fields, dict) else None
            if entry_id is not None:
                ids.append(entry_id)
            if isinstance(key, bytes) and len(key) <= MAX_KEY and key_slot(key) == slot:
                keys.append(key)
        return list(dict.fromkeys(keys)), ids


class _Pending:
    """Rows read and not yet committed, committed whenever they hold
    PENDING_BYTES of text (and at ``commit``)."""

    def __init__(self, fulltext: FullText):
        self.fulltext = fulltext
        self.puts: list[tuple] = []
        self.drops: list[bytes] = []
        self.bytes = self.documents = 0

    def put(self, row: tuple) -> None:
        self.puts.append(row)
        self.bytes += len(row[3])
        self.documents += 1
        if self.bytes >= PENDING_BYTES:
            self.commit()

    def drop(self, key_id: bytes) -> None:
        self.drops.append(key_id)
        self.documents += 1

    def commit(self) -> None:
        if self.puts or self.drops:
            self.fulltext.apply(self.puts, self.drops)
        self.puts, self.drops, self.bytes = [], [], 0
