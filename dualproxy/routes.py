"""Which route a request belongs to: the longest mount that covers its path.

Pure (no I/O). Both router faces (router.py) ask the same question of the same
table: the routes' mounts (normalized as ProxyConfig does: `""` is the root),
matched on segment boundaries by the one routing rule (`target.choose_mount`,
which reads the path as upstreams may normalise it), so `/api` takes `/api` and
`/api/x` but never `/apix`, and `/api/v2` wins over `/api` for `/api/v2/x`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import BadRequest
from .target import choose_mount, target_path


class RouteTable:
    """The mounts of several routes, by index; refuses a mount given twice."""

    __slots__ = ("mounts", "_index", "_max_target_bytes")

    def __init__(self, mounts: Sequence[str], max_target_bytes: int | None = None) -> None:
        encoded = [mount.encode("latin-1") for mount in mounts]
        if not encoded:
            raise ValueError("a router needs at least one route")
        seen: dict[bytes, int] = {}
        for index, mount in enumerate(encoded):
            if mount in seen:
                raise ValueError(f"mount {mount.decode('latin-1') or '/'!r} is given twice "
                                 f"(routes {seen[mount] + 1} and {index + 1})")
            seen[mount] = index
        self.mounts = tuple(encoded)
        self._index = seen
        self._max_target_bytes = max_target_bytes

    def match(self, target: bytes) -> int | None:
        """The index of the route for a raw request-target; None when no mount covers
        it, or when its readings disagree (the route's own plan then answers 400).

        A target longer than every route accepts is not read at all (None: the
        first route answers 414): the routing rule reads a path some twenty ways,
        and the server may pass targets eight times longer than the routes take.
        """
        if self._max_target_bytes is not None and len(target) > self._max_target_bytes:
            return None
        try:
            mount = choose_mount(target_path(target), self.mounts)
        except BadRequest:
            return None
        return None if mount is None else self._index[mount]
