"""Hooks: user code that sees (and may replace) the core's neutral objects.

A request hook gets the `UpstreamPlan` and returns a replacement plan or None
(keep it); raising a `ProxyError` refuses the request with that status. A
response hook gets the plan and the `ResponseHead` and returns a replacement head
or None. Plain `def` hooks run on both faces, so one config can serve both.
`async def` hooks run on the async face only: the sync face has no event loop,
so `SyncProxy` refuses a config holding one, with a TypeError at construction.

What a hook leaves behind (returned, or changed in place) is checked against
the wire rule (wire.py) right after it ran: a target or header that must not
be written is a 502 naming the hook in the log (`InvalidHead`), never sent. A
response hook may not change the body's framing (Content-Length,
Transfer-Encoding): the body relayed is still the upstream's.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from .core import ResponseHead, UpstreamPlan
from .errors import InvalidHead
from .headers import Header
from .wire import WireError, field_problem, head_problem

RequestHook = Callable[[UpstreamPlan], UpstreamPlan | None | Awaitable[UpstreamPlan | None]]
ResponseHook = Callable[
    [UpstreamPlan, ResponseHead], ResponseHead | None | Awaitable[ResponseHead | None]
]

_T = TypeVar("_T", UpstreamPlan, ResponseHead)
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


def is_async_hook(hook: Callable[..., object]) -> bool:
    """An `async def` function, or an object whose `__call__` is one."""
    return (inspect.iscoroutinefunction(hook)
            or inspect.iscoroutinefunction(type(hook).__call__))


def require_sync_hooks(hooks: Iterable[Callable[..., object]]) -> None:
    """Refuse async hooks for the sync face, naming them."""
    names = [getattr(hook, "__qualname__", repr(hook)) for hook in hooks if is_async_hook(hook)]
    if names:
        raise TypeError(
            f"SyncProxy cannot run async hooks ({', '.join(names)}): the WSGI face has no "
            "event loop. Use plain `def` hooks (they run on both faces) or AsyncProxy.")


def _name(hook: Callable[..., object]) -> str:
    return getattr(hook, "__qualname__", None) or repr(hook)


def hook_result(hook: Callable[..., object], result: object, current: _T,
                framing: list[Header] | None = None) -> _T:
    """What a hook's (awaited) result means: None keeps `current`, else a replacement.
    Either way it must be writable (InvalidHead, a 502, when it is not); a response
    head must keep `framing`, the framing fields the core gave it."""
    if result is None:
        result = current  # the hook may have changed the header list in place
    elif not isinstance(result, type(current)):
        if inspect.iscoroutine(result):
            result.close()  # never awaited: no "coroutine was never awaited" warning later
        raise TypeError(f"hook {_name(hook)!r} returned "
                        f"{type(result).__name__}, expected {type(current).__name__} or None")
    problem = (_plan_problem(result) if isinstance(result, UpstreamPlan)
               else field_problem(result.headers) or _framing_problem(result, framing))
    if problem is not None:
        raise InvalidHead(problem, _name(hook))
    return result


def _plan_problem(plan: UpstreamPlan) -> WireError | None:
    method = plan.method.encode("latin-1", "replace") if isinstance(plan.method, str) else b""
    return head_problem(plan.target, plan.headers, method)


def response_framing(head: ResponseHead) -> list[Header]:
    """The fields that frame a response body (Content-Length, Transfer-Encoding)."""
    return [(name.lower(), value) for name, value in head.headers
            if isinstance(name, bytes) and name.lower() in _FRAMING]


def _framing_problem(head: ResponseHead, framing: list[Header] | None) -> WireError | None:
    # The body relayed is the upstream's, framed as the core said: a hook's second or
    # other Content-Length, or a Transfer-Encoding beside it, is written by the servers
    # as given (gunicorn then sends the shorter length and keeps the connection), so a
    # client or a front proxy would read the next response as this one's body.
    if framing is None or response_framing(head) == framing:
        return None
    return WireError("header", "a response hook changed Content-Length or Transfer-Encoding")


def run_request_hooks(hooks: Iterable[RequestHook], plan: UpstreamPlan) -> UpstreamPlan:
    """The sync face's hook loop (coroutine results were refused at construction)."""
    for hook in hooks:
        plan = hook_result(hook, hook(plan), plan)
    return plan


def run_response_hooks(hooks: Iterable[ResponseHook], plan: UpstreamPlan,
                       head: ResponseHead) -> ResponseHead:
    framing = response_framing(head)
    for hook in hooks:
        head = hook_result(hook, hook(plan, head), head, framing)
    return head


async def _settle(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def arun_request_hooks(hooks: Iterable[RequestHook], plan: UpstreamPlan) -> UpstreamPlan:
    """The async face's hook loop: sync and async hooks alike."""
    for hook in hooks:
        plan = hook_result(hook, await _settle(hook(plan)), plan)
    return plan


async def arun_response_hooks(hooks: Iterable[ResponseHook], plan: UpstreamPlan,
                              head: ResponseHead) -> ResponseHead:
    framing = response_framing(head)
    for hook in hooks:
        head = hook_result(hook, await _settle(hook(plan, head)), head, framing)
    return head


# -- hooks as filters ------------------------------------------------------------------------
# A hook is the oldest kind of filter: the chain (filters/chain.py) runs it at its
# stage, and what it leaves is checked by the same rule as above.

from .filters.base import Exchange, Filter  # noqa: E402  (filters.base imports core only)


class RequestHookFilter(Filter):
    """A plain `def` request hook, as a filter."""

    def __init__(self, hook: RequestHook) -> None:
        self.hook = hook
        self.name = _name(hook)

    def on_request(self, exchange: Exchange) -> None:
        assert exchange.plan is not None
        exchange.plan = hook_result(self.hook, self.hook(exchange.plan), exchange.plan)


class AsyncRequestHookFilter(RequestHookFilter):
    """An `async def` request hook, as a filter (the async face only)."""

    async def on_request(self, exchange: Exchange) -> None:  # type: ignore[override]
        assert exchange.plan is not None
        exchange.plan = hook_result(self.hook, await _settle(self.hook(exchange.plan)),
                                    exchange.plan)


class ResponseHookFilter(Filter):
    """A plain `def` response hook, as a filter (the chain checks the framing)."""

    def __init__(self, hook: ResponseHook) -> None:
        self.hook = hook
        self.name = _name(hook)

    def on_response(self, exchange: Exchange, head: ResponseHead) -> ResponseHead:
        assert exchange.plan is not None
        return hook_result(self.hook, self.hook(exchange.plan, head), head)


class AsyncResponseHookFilter(ResponseHookFilter):
    """An `async def` response hook, as a filter (the async face only)."""

    async def on_response(  # type: ignore[override]
            self, exchange: Exchange, head: ResponseHead) -> ResponseHead:
        assert exchange.plan is not None
        return hook_result(self.hook, await _settle(self.hook(exchange.plan, head)), head)


def hook_filters(request_hooks: Iterable[RequestHook],
                 response_hooks: Iterable[ResponseHook]) -> list[Filter]:
    """The hooks of a config as filters: request hooks in order, then response hooks
    (which the chain runs from the last to the first, so they keep the order they
    were given in: the chain's way down is reversed)."""
    filters: list[Filter] = []
    for hook in request_hooks:
        filters.append(AsyncRequestHookFilter(hook) if is_async_hook(hook)
                       else RequestHookFilter(hook))
    for response_hook in reversed(list(response_hooks)):
        filters.append(AsyncResponseHookFilter(response_hook) if is_async_hook(response_hook)
                       else ResponseHookFilter(response_hook))
    return filters
