"""The Redis store (`--cache-store redis://host:port/db`): one cache for several proxy
processes and machines (the `redis` extra: redis-py).

Per URI, a hash `dualproxy:cache:i:<key>` maps each stored variant (its secondary
key, JSON) to its status, fields and times (JSON); each body is a string key of its
own, read only when it answers. The bound in bytes is kept with a counter and an
LRU sorted set (URIs by last use); past it, the least recently used URIs go.

What the store does is written once, sans-IO (`Commands`): each operation is a
generator that yields a pipeline of Redis commands and is sent their replies. Two
thin drivers run it: `RedisStore` with redis-py's sync client (the sync face), and
`AsyncRedisStore` with its asyncio client (the async face: each call is awaited, the
event loop serves other requests meanwhile). Both are wrapped in `Guarded`, so a
Redis that is down makes the cache step aside.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Generator
from typing import Any, TypeVar

from .sqlite import entry_from_row, meta_of, variant_of
from .store import DEFAULT_MAX_OBJECT, DEFAULT_MAX_SIZE, Body, Bounded, Entry, Store

PREFIX = "dualproxy:cache:"
_BYTES = f"{PREFIX}bytes"
_LRU = f"{PREFIX}lru"
# Short timeouts, one retry on a fresh connection (one Redis closed), no backoff: a
# Redis that does not answer makes the cache step aside quickly.
_TIMEOUT = 1.0

T = TypeVar("T")
Command = tuple[Any, ...]
# An operation: yields pipelines of commands, is sent their replies, returns its value.
Ops = Generator[list[Command], list[Any], T]


def _index(key: str) -> str:
    return f"{PREFIX}i:{key}"


def _body_key(key: str, variant: str) -> str:
    return f"{PREFIX}b:" + hashlib.sha256(f"{key}\n{variant}".encode()).hexdigest()


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
            entry.ref = variant_text
            entries.append(entry)
        return entries

    def load(self, entry: Entry) -> Ops[Body | None]:
        if entry.loader is None:
            return entry.body
        if not isinstance(entry.ref, str):
            return None
        (body,) = yield [("GET", _body_key(entry.key, entry.ref))]
        if body is None:
            return None  # evicted since its lookup: a miss
        entry.body, entry.loader = bytes(body), None
        return entry.body

    def put(self, entry: Entry) -> Ops[None]:
        size = entry.measure()
        if size > self.max_object:
            return
        variant = variant_of(entry)
        index = _index(entry.key)
        (old,) = yield [("HGET", index, variant)]
        meta = meta_of(entry)
        meta["length"], meta["size"] = entry.body_length(), size
        yield [("HSET", index, variant, json.dumps(meta)),
               ("SET", _body_key(entry.key, variant), bytes(entry.content())),
               ("INCRBY", _BYTES, size - (json.loads(old)["size"] if old else 0)),
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
        if not isinstance(entry.ref, str):
            return
        meta = meta_of(entry)
        meta["length"], meta["size"] = entry.body_length(), entry.measure()
        yield [("HSET", _index(entry.key), entry.ref, json.dumps(meta))]

    def remove(self, key: str) -> Ops[int]:
        index = _index(key)
        (stored,) = yield [("HGETALL", index)]
        size = sum(json.loads(meta)["size"] for meta in stored.values())
        yield [("DEL", index, *(_body_key(key, v.decode()) for v in stored)),
               ("DECRBY", _BYTES, size), ("ZREM", _LRU, key)]
        return len(stored)

    def discard(self, entry: Entry) -> Ops[None]:
        if not isinstance(entry.ref, str):
            return
        index = _index(entry.key)
        (meta,) = yield [("HGET", index, entry.ref)]
        if meta is None:
            return
        yield [("HDEL", index, entry.ref), ("DEL", _body_key(entry.key, entry.ref)),
               ("DECRBY", _BYTES, json.loads(meta)["size"])]


def _step(ops: Ops[T], replies: list[Any] | None) -> tuple[list[Command] | None, Any]:
    """Send an operation the last replies: its next commands, or None and its value."""
    try:
        return ops.send(replies), None  # type: ignore[arg-type]
    except StopIteration as stop:
        return None, stop.value


class _Driver(Bounded):
    """A store running `Commands` through a client (`_run`: the I/O)."""

    name = "redis"

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

    def get(self, key: str) -> Any:
        return self._run(self.commands.get(key))

    def load(self, entry: Entry) -> Any:
        return self._run(self.commands.load(entry))

    def put(self, entry: Entry) -> Any:
        return self._run(self.commands.put(entry))

    def update(self, entry: Entry) -> Any:
        return self._run(self.commands.update(entry))

    def remove(self, key: str) -> Any:
        return self._run(self.commands.remove(key))

    def discard(self, entry: Entry) -> Any:
        return self._run(self.commands.discard(entry))


class RedisStore(_Driver):
    """Through redis-py's sync client (the sync face: each worker thread waits)."""

    _client: Any = None

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


class AsyncRedisStore(_Driver):
    """Through redis-py's asyncio client (the async face: awaited, the loop goes on),
    made in the running loop (again if another loop runs this proxy later)."""

    _client: Any = None
    _loop: asyncio.AbstractEventLoop | None = None

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

    def for_sync_face(self) -> Store:
        return RedisStore(self.url, self.max_size, self.max_object)
