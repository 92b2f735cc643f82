"""The sqlite store (`--cache-store sqlite:PATH`): one file the worker processes of a
machine share, so a response stored by one worker is a hit on every other.

One row a stored variant: its key, secondary key, status, fields and times as JSON,
its body as a BLOB read only when it answers. Bounded by bytes like the memory
store (least recently used rows evicted first, `used` updated on every lookup).
WAL mode, one connection a process (opened at first use, after a pre-fork server
forked) behind a lock; sqlite's own locking orders the processes. Calls are short
local file I/O, made inline on both faces.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from .keys import VaryValues
from .store import DEFAULT_MAX_OBJECT, DEFAULT_MAX_SIZE, Bounded, Entry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    variant TEXT NOT NULL,
    meta TEXT NOT NULL,
    size INTEGER NOT NULL,
    used REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_key ON entries (key);
CREATE INDEX IF NOT EXISTS entries_used ON entries (used);
"""


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def variant_of(entry: Entry) -> str:
    """An entry's secondary key as text (JSON), as the shared stores keep it."""
    return json.dumps([[_text(n) for n in entry.vary], [_text(v) for v in entry.selected]])


def meta_of(entry: Entry) -> dict[str, Any]:
    """An entry's status, fields and times, JSON-able."""
    return {"status": entry.status, "request_time": entry.request_time,
            "response_time": entry.response_time, "date": entry.date,
            "initial_age": entry.initial_age,
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in entry.headers]}


def entry_from_row(key: str, variant: str, meta: dict[str, Any], length: int,
                   loader: Callable[[], bytes]) -> Entry:
    """An entry read back (its body read by `loader` when it answers)."""
    names, selected = json.loads(variant)
    values: VaryValues = tuple(None if v is None else v.encode("latin-1") for v in selected)
    entry = Entry(key, tuple(n.encode("latin-1") for n in names), values, meta["status"],
                  [(n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["headers"]],
                  meta["request_time"], meta["response_time"], meta["date"],
                  meta["initial_age"], length=length, loader=loader)
    entry.measure()
    return entry


class SqliteStore(Bounded):
    """Entries in an sqlite file shared by this machine's workers."""

    name = "sqlite"

    def __init__(self, path: str, max_size: int = DEFAULT_MAX_SIZE,
                 max_object: int = DEFAULT_MAX_OBJECT) -> None:
        self.path = path
        self.max_size = max_size
        self.max_object = min(max_object, max_size)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0

    def _db(self) -> sqlite3.Connection:
        import os

        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False,
                                   isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def get(self, key: str) -> list[Entry]:
        with self._lock:
            db = self._db()
            rows = db.execute("SELECT id, variant, meta, length(body) FROM entries "
                              "WHERE key = ?", (key,)).fetchall()
            if rows:
                db.execute("UPDATE entries SET used = ? WHERE key = ?", (time.time(), key))
        return [self._entry(key, *row) for row in rows]

    def _entry(self, key: str, row_id: int, variant: str, meta: str, length: int) -> Entry:
        entry = entry_from_row(key, variant, json.loads(meta), length,
                               lambda: self._body(row_id))
        entry.ref = row_id
        return entry

    def _body(self, row_id: int) -> bytes:
        with self._lock:
            row = self._db().execute("SELECT body FROM entries WHERE id = ?",
                                     (row_id,)).fetchone()
        return bytes(row[0]) if row is not None else b""

    @staticmethod
    def _meta(entry: Entry) -> str:
        return json.dumps(meta_of(entry))

    def put(self, entry: Entry) -> None:
        size = self.fits(entry)
        if size is None:
            return
        variant = variant_of(entry)
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM entries WHERE key = ? AND variant = ?",
                           (entry.key, variant))
                db.execute("INSERT INTO entries (key, variant, meta, size, used, body) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           (entry.key, variant, self._meta(entry), size, time.time(),
                            entry.content()))
                self._evict(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _evict(self, db: sqlite3.Connection) -> None:
        total = db.execute("SELECT coalesce(sum(size), 0) FROM entries").fetchone()[0]
        while total > self.max_size:
            row = db.execute("SELECT id, size FROM entries ORDER BY used LIMIT 1").fetchone()
            if row is None:
                return
            db.execute("DELETE FROM entries WHERE id = ?", (row[0],))
            total -= row[1]

    def update(self, entry: Entry) -> None:
        row_id = entry.ref
        if not isinstance(row_id, int):
            return
        with self._lock:
            self._db().execute("UPDATE entries SET meta = ?, used = ? WHERE id = ?",
                               (self._meta(entry), time.time(), row_id))

    def remove(self, key: str) -> int:
        with self._lock:
            return self._db().execute("DELETE FROM entries WHERE key = ?", (key,)).rowcount

    def discard(self, entry: Entry) -> None:
        row_id = entry.ref
        if not isinstance(row_id, int):
            return
        with self._lock:
            self._db().execute("DELETE FROM entries WHERE id = ?", (row_id,))
