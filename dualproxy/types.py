"""The ASGI and WSGI type aliases, once for the whole package (Starlette's `types.py` idea)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from types import TracebackType
from typing import Any, Protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Environ = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class StartResponse(Protocol):
    """PEP 3333's `start_response`."""

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = ...
    ) -> Callable[[bytes], object]: ...


WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class FilterLike(Protocol):
    """What the configuration holds of a route's filter: `filters.base.Filter` is one
    (the configuration sits below the filters; the chain checks the class when a
    proxy builds it, a TypeError for anything else)."""

    def label(self) -> str: ...
