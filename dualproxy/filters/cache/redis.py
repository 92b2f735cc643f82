"""The Redis store (`--cache-store redis://host:port/db`): one cache for several proxy
processes and machines (the `redis` extra: redis-py).

Per URI, a hash `dualproxy:cache:i:<key>` maps each stored variant (its secondary
key, JSON) to its status, fields, times and body (JSON: the body's version, a random
nonce, and its count of chunks). A body is kept in chunks of `CHUNK` bytes, string
keys `dualproxy:cache:b:<sha256(key, variant)>:<nonce>:<n>`, written before the
variant's field (which is set last: a half-written body is never served) and read
back one `SLICE` at a time as the client takes it (a hit holds a few chunks, not the
body). A write that ends without a commit (the body cut, the client gone, past the
object limit, an error) deletes the chunks it wrote at once (`Commands.abort`: only
its own nonce's, never once its commit was sent); each chunk also has a TTL until the
commit (`ORPHAN_TTL`: what an abort could not delete does not stay for long).
Setting, updating and dropping a variant's field are Lua scripts, atomic: of two
writers of one variant, each removes the chunks of the body it replaced (the nonce
keeps their chunks apart), none leaks.
The bound in bytes is kept with a counter and an LRU sorted set (URIs by last use);
past it, the least recently used URIs go, their chunks with them.

What the store does is written once, sans-IO (`Commands`): each operation is a
generator that yields a pipeline of Redis commands and is sent their replies. Two
thin drivers run it: `RedisStore` with redis-py's sync client (the sync face), and
`AsyncRedisStore` with its asyncio client (the async face: each call is awaited, the
event loop serves other requests meanwhile). Both are wrapped in `Guarded`, so a
Redis that is down makes the cache step aside; one that fails midway through a hit's
body aborts that answer (`UpstreamBroken`: never ended as if complete).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Generator, Iterator
from typing import Any, TypeVar

from ...errors import UpstreamBroken
from .sqlite import entry_from_row, meta_of, variant_of
from .store import DEFAULT_MAX_OBJECT, DEFAULT_MAX_SIZE, SLICE, Body, Bounded, Entry, Store, Writer

PREFIX = "dualproxy:cache:"
_BYTES = f"{PREFIX}bytes"
_LRU = f"{PREFIX}lru"
# Short timeouts, one retry on a fresh connection (one Redis closed), no backoff: a
# Redis that does not answer makes the cache step aside quickly.
_TIMEOUT = 1.0
CHUNK = 256 * 1024          # a body's chunk (one string key)
_BATCH = SLICE // CHUNK     # chunks a round trip writes or reads
ORPHAN_TTL = 3600           # seconds an uncommitted chunk lives

# KEYS: the index, the new body's chunks. ARGV: the variant, its meta. Persists the
# chunks, sets the field; the meta it replaced (its chunks are the caller's to drop).
_COMMIT = """
for i = 2, #KEYS do redis.call('PERSIST', KEYS[i]) end
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return old
"""
# KEYS: the index. ARGV: the variant, its body's nonce, the new meta (empty: drop it).
# Changes the field only while it still holds that body; the meta it held then.
_IF_SAME = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old or cjson.decode(old)['body'] ~= ARGV[2] then return false end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1])
else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return old
"""
# KEYS: the index. Drops it; every variant's meta it held (flat: field, meta, ...).
_DROP = """
local all = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return all
"""

T = TypeVar("T")
Command = tuple[Any, ...]
# An operation: yields pipelines of commands, is sent their replies, returns its value.
Ops = Generator[list[Command], list[Any], T]


def _index(key: str) -> str:
    return f"{PREFIX}i:{key}"


def _base(key: str, variant: str) -> str:
    return f"{PREFIX}b:" + hashlib.sha256(f"{key}\n{variant}".encode()).hexdigest()


def chunk_keys(key: str, variant: str, meta: dict[str, Any]) -> list[str]:
    """The keys of a stored body's chunks, in order."""
    if "body" not in meta:  # the layout before chunks: one key
        return [_base(key, variant)]
    return [f"{_base(key, variant)}:{meta['body']}:{n}" for n in range(meta["chunks"])]


class Upload:
    """A body being written (a new entry's `ref` until it is committed): its variant,
    nonce, how many chunks are in Redis (`written`) and were sent (`sent`: a write cut
    midway may have landed), and whether its commit was sent (its chunks are then the
    entry's, never the writer's to delete)."""

    __slots__ = ("variant", "nonce", "written", "sent", "failed", "committed")

    def __init__(self, entry: Entry) -> None:
        self.variant, self.nonce = variant_of(entry), os.urandom(8).hex()
        self.written = self.sent = 0
        self.failed = self.committed = False

    def keys(self, entry: Entry, start: int, stop: int) -> list[str]:
        base = f"{_base(entry.key, self.variant)}:{self.nonce}"
        return [f"{base}:{n}" for n in range(start, stop)]


def _deleted(keys: list[str]) -> list[Command]:
    return [("DEL", *keys)] if keys else []


def _unloaded() -> bytes:
    raise RuntimeError("a Redis entry's body is read with the store's `load`")


class Commands:
    """The Redis store's logic as pipelines of commands (no I/O here)."""

    def __init__(self, max_size: int, max_object: int) -> None:
        self.max_size = max_size
        self.max_object = max_object

    def get(self, key: str) -> Ops[list[Entry]]:
        stored, _ = yield [("HGETALL", _index(key)), ("ZADD", _LRU, "XX", time.time(), key)]
        entries = []
        for variant, meta in stored.items():
            variant_text = variant.decode()
            m = json.loads(meta)
            entry = entry_from_row(key, variant_text, m, m["length"], _unloaded)
            entry.ref = (variant_text, m)
            entries.append(entry)
        return entries

    def load(self, entry: Entry) -> Ops[Body | None]:
        """The body's first slice (None: gone, a miss); the rest is `read` as it goes."""
        if entry.loader is None:
            return entry.body
        if not isinstance(entry.ref, tuple) or "body" not in entry.ref[1]:
            return None  # none, or stored by an older layout: a miss
        if entry.body_length() == 0:
            entry.body, entry.loader = b"", None
            return entry.body
        return (yield from self.read(entry, 0))  # None: evicted since the lookup

    @staticmethod
    def batches(entry: Entry, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """The reads that give bytes [start, end) of `entry`'s body: (offset of the
        batch's first chunk, from, to) within the body, a `SLICE` at most each."""
        for at in range(start - start % SLICE, end, SLICE):
            yield at, max(start, at), min(end, at + SLICE)

    def read(self, entry: Entry, at: int) -> Ops[bytes | None]:
        """The chunks from body offset `at` (a `SLICE` of them, fewer at the end),
        joined; None when one is missing (the body was replaced or evicted since its
        lookup)."""
        assert isinstance(entry.ref, tuple)
        variant, meta = entry.ref
        keys = chunk_keys(entry.key, variant, meta)[at // CHUNK:at // CHUNK + _BATCH]
        pieces = yield [("GET", k) for k in keys]
        if not pieces or any(p is None for p in pieces):
            return None
        return b"".join(pieces)

    @staticmethod
    def flush(entry: Entry, upload: Upload, body: Body, final: bool) -> Ops[None]:
        """Write `body`'s whole chunks not yet written (`final`: the last, short one
        too), a `SLICE` a round trip, each with a TTL until the commit."""
        count = -(-len(body) // CHUNK) if final else len(body) // CHUNK
        while upload.written < count:
            stop = min(count, upload.written + _BATCH)
            keys = upload.keys(entry, upload.written, stop)
            upload.sent = max(upload.sent, stop)
            yield [("SET", k, bytes(body[n * CHUNK:(n + 1) * CHUNK]), "EX", ORPHAN_TTL)
                   for n, k in enumerate(keys, upload.written)]
            upload.written = stop

    @staticmethod
    def abort(entry: Entry, upload: Upload) -> Ops[None]:
        """The body will not be stored (cut, the client gone, past the object limit, a
        failure): delete the chunks this upload sent, none once its commit was sent (a
        committed entry's) and no other writer's (another nonce). No round trip when
        there is nothing to delete."""
        upload.failed = True
        if upload.committed or not upload.sent:
            return
        keys, upload.written, upload.sent = upload.keys(entry, 0, upload.sent), 0, 0
        yield _deleted(keys)

    def put(self, entry: Entry) -> Ops[None]:
        size = entry.measure()
        if size > self.max_object:
            return
        upload = entry.ref if isinstance(entry.ref, Upload) else Upload(entry)
        if upload.failed:
            raise ConnectionError("writing the body's chunks failed: not stored")
        body = entry.content()
        yield from self.flush(entry, upload, body, True)
        variant = upload.variant
        meta = meta_of(entry)
        meta.update(length=len(body), size=size, body=upload.nonce, chunks=upload.written)
        keys = chunk_keys(entry.key, variant, meta)
        upload.committed = True  # from here on its chunks may be the entry's
        (old,) = yield [("EVAL", _COMMIT, 1 + len(keys), _index(entry.key), *keys, variant,
                         json.dumps(meta))]
        entry.ref = (variant, meta)
        gone = chunk_keys(entry.key, variant, json.loads(old)) if old else []
        yield [*_deleted(gone), ("INCRBY", _BYTES, size - (json.loads(old)["size"] if old else 0)),
               ("ZADD", _LRU, time.time(), entry.key)]
        while True:  # evict the least recently used URIs past the bound
            (total,) = yield [("GET", _BYTES)]
            if int(total or 0) <= self.max_size:
                return
            (oldest,) = yield [("ZPOPMIN", _LRU)]
            if not oldest:
                return
            yield from self.remove(oldest[0][0].decode())

    def update(self, entry: Entry) -> Ops[None]:
        if not isinstance(entry.ref, tuple) or "body" not in entry.ref[1]:
            return
        variant, stored = entry.ref
        meta = meta_of(entry)
        meta.update(length=entry.body_length(), size=entry.measure(), body=stored["body"],
                    chunks=stored["chunks"])
        yield [("EVAL", _IF_SAME, 1, _index(entry.key), variant, stored["body"],
                json.dumps(meta))]

    def remove(self, key: str) -> Ops[int]:
        (flat,) = yield [("EVAL", _DROP, 1, _index(key))]
        stored = {flat[i].decode(): json.loads(flat[i + 1]) for i in range(0, len(flat), 2)}
        gone = [k for variant, meta in stored.items() for k in chunk_keys(key, variant, meta)]
        yield [*_deleted(gone), ("DECRBY", _BYTES, sum(meta["size"] for meta in stored.values())),
               ("ZREM", _LRU, key)]
        return len(stored)

    def discard(self, entry: Entry) -> Ops[None]:
        if not isinstance(entry.ref, tuple) or "body" not in entry.ref[1]:
            return
        variant, stored = entry.ref
        (old,) = yield [("EVAL", _IF_SAME, 1, _index(entry.key), variant, stored["body"], "")]
        if old is None:
            return
        meta = json.loads(old)
        yield [*_deleted(chunk_keys(entry.key, variant, meta)),
               ("DECRBY", _BYTES, meta["size"])]


def _step(ops: Ops[T], replies: list[Any] | None) -> tuple[list[Command] | None, Any]:
    """Send an operation the last replies: its next commands, or None and its value."""
    try:
        return ops.send(replies), None  # type: ignore[arg-type]
    except StopIteration as stop:
        return None, stop.value


class _Driver(Bounded):
    """A store running `Commands` through a client (`_run`: the I/O)."""

    name = "redis"
    _client: Any = None

    def __init__(self, url: str, max_size: int = DEFAULT_MAX_SIZE,
                 max_object: int = DEFAULT_MAX_OBJECT) -> None:
        self.url = url
        self.max_size = max_size
        self.max_object = min(max_object, max_size)
        self.commands = Commands(self.max_size, self.max_object)

    def _run(self, ops: Ops[T]) -> Any:
        raise NotImplementedError

    def _made(self) -> Any:
        raise NotImplementedError

    def _pipeline(self, commands: list[Command]) -> Any:
        """One round trip's commands, queued on the client's pipeline (no MULTI)."""
        pipe = self._made().pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe

    def writer(self, entry: Entry) -> Writer:
        return _Writer(entry, self.max_object, self)

    def guarded(self, upload: Upload, ops: Ops[None]) -> Awaitable[None] | None:
        """Run a writer's operation; when it fails the upload is marked failed (its
        entry is then not stored: `put` raises, the store's guard counts it)."""
        try:
            result = self._run(ops)
        except Exception:
            upload.failed = True
            return None
        return self._awaited(upload, result) if inspect.isawaitable(result) else None

    @staticmethod
    async def _awaited(upload: Upload, result: Awaitable[None]) -> None:
        try:
            await result
        except Exception:
            upload.failed = True

    def get(self, key: str) -> Any:
        return self._run(self.commands.get(key))

    def load(self, entry: Entry) -> Any:
        return self._run(self._load(entry))

    def _load(self, entry: Entry) -> Ops[Body | None]:
        first = yield from self.commands.load(entry)
        if first is not None and entry.loader is not None:
            entry.stream = lambda start, end: self._stream(entry, first, start, end)
        return first

    def _stream(self, entry: Entry, first: Body, start: int, end: int) -> Any:
        raise NotImplementedError

    def put(self, entry: Entry) -> Any:
        return self._run(self.commands.put(entry))

    def update(self, entry: Entry) -> Any:
        return self._run(self.commands.update(entry))

    def remove(self, key: str) -> Any:
        return self._run(self.commands.remove(key))

    def discard(self, entry: Entry) -> Any:
        return self._run(self.commands.discard(entry))


class _Writer(Writer):
    """Writes the body to Redis as it comes, a `SLICE` at a time (`flush`), while
    keeping it for the followers of a collapsed miss (store.Writer)."""

    __slots__ = ("driver", "upload")

    def __init__(self, entry: Entry, limit: int, driver: _Driver) -> None:
        super().__init__(entry, limit)
        self.driver, self.upload = driver, Upload(entry)
        entry.ref = self.upload

    def flush(self) -> Awaitable[None] | None:
        upload = self.upload
        if upload.failed:
            return None
        if not self.ok and self.size > self.limit:  # past the limit: never stored
            return self.abort()
        if not self.ok or len(self.buffer) // CHUNK - upload.written < _BATCH:
            return None
        return self.driver.guarded(upload, self.driver.commands.flush(
            self.entry, upload, self.buffer, False))

    def abort(self) -> Awaitable[None] | None:
        return self.driver.guarded(self.upload, self.driver.commands.abort(self.entry,
                                                                           self.upload))


def _piece(piece: Body | None, at: int, lo: int, hi: int) -> bytes:
    """Bytes [lo, hi) of the body from a read at `at` (UpstreamBroken: none read)."""
    if piece is None:
        raise UpstreamBroken("a stored body's chunk is gone from Redis (replaced midway)")
    if lo == at and hi - lo == len(piece):
        return bytes(piece)
    return bytes(piece[lo - at:hi - at])


class RedisStore(_Driver):
    """Through redis-py's sync client (the sync face: each worker thread waits)."""

    def _made(self) -> Any:
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self._client = redis.Redis.from_url(
                self.url, socket_timeout=_TIMEOUT, socket_connect_timeout=_TIMEOUT,
                retry=Retry(NoBackoff(), 1))
        return self._client

    def _run(self, ops: Ops[T]) -> T:
        commands, value = _step(ops, None)
        while commands is not None:
            commands, value = _step(ops, self._pipeline(commands).execute())
        return value  # type: ignore[no-any-return]

    def _stream(self, entry: Entry, first: Body, start: int, end: int) -> Iterator[bytes]:
        for at, lo, hi in self.commands.batches(entry, start, end):
            try:
                piece = first if at == 0 else self._run(self.commands.read(entry, at))
            except Exception as exc:
                raise UpstreamBroken(f"the Redis store failed mid-body: {exc!r}") from exc
            yield _piece(piece, at, lo, hi)

    def close(self) -> None:
        """Close the client's connections (a next call opens others)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()


class AsyncRedisStore(_Driver):
    """Through redis-py's asyncio client (the async face: awaited, the loop goes on),
    made in the running loop (again if another loop runs this proxy later)."""

    _loop: asyncio.AbstractEventLoop | None = None
    synchronous = False

    def _made(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            self._loop = loop
            self._client = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=_TIMEOUT, socket_connect_timeout=_TIMEOUT,
                retry=Retry(NoBackoff(), 1))
        return self._client

    async def _run(self, ops: Ops[T]) -> T:
        commands, value = _step(ops, None)
        while commands is not None:
            commands, value = _step(ops, await self._pipeline(commands).execute())
        return value  # type: ignore[no-any-return]

    async def _stream(self, entry: Entry, first: Body, start: int,
                      end: int) -> AsyncIterator[bytes]:
        for at, lo, hi in self.commands.batches(entry, start, end):
            try:
                piece = first if at == 0 else await self._run(self.commands.read(entry, at))
            except Exception as exc:
                raise UpstreamBroken(f"the Redis store failed mid-body: {exc!r}") from exc
            yield _piece(piece, at, lo, hi)

    async def aclose(self) -> None:
        """Close the client's connections, from the loop that uses them."""
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()

    def for_sync_face(self) -> Store:
        return RedisStore(self.url, self.max_size, self.max_object)
