"""Which route a request belongs to: the longest mount that covers its path.

Pure (no I/O). Both router faces (router.py) ask the same question of the same
table: the routes' mounts (normalized as ProxyConfig does: `""` is the root),
matched on segment boundaries against the raw path, so `/api` takes `/api` and
`/api/x` but never `/apix`, and `/api/v2` wins over `/api` for `/api/v2/x`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .target import target_path, under_mount


class RouteTable:
    """The mounts of several routes, by index; refuses a mount given twice."""

    __slots__ = ("mounts", "_longest_first")

    def __init__(self, mounts: Sequence[str]) -> None:
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
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        self._longest_first = tuple((encoded[i], i) for i in order)

    def match(self, target: bytes) -> int | None:
        """The index of the route for a raw request-target, or None when no mount covers it."""
        return longest_mount(self._longest_first, target_path(target))


def longest_mount(longest_first: Sequence[tuple[bytes, int]], path: bytes) -> int | None:
    """The index paired with the first (longest) mount covering `path`, else None."""
    for mount, index in longest_first:
        if under_mount(path, mount):
            return index
    return None
