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

Hooks run as filters of the route's chain, after the user's filters
(filters/hooked.py wraps each one; the chain checks the framing).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .core import ResponseHead, UpstreamPlan
from .errors import InvalidHead
from .wire import WireError, field_problem, head_problem

RequestHook = Callable[[UpstreamPlan], UpstreamPlan | None | Awaitable[UpstreamPlan | None]]
ResponseHook = Callable[
    [UpstreamPlan, ResponseHead], ResponseHead | None | Awaitable[ResponseHead | None]
]

_T = TypeVar("_T", UpstreamPlan, ResponseHead)


def is_async_hook(hook: Callable[..., object]) -> bool:
    """An `async def` function, or an object whose `__call__` is one."""
    return (inspect.iscoroutinefunction(hook)
            or inspect.iscoroutinefunction(type(hook).__call__))


def _name(hook: Callable[..., object]) -> str:
    return getattr(hook, "__qualname__", None) or repr(hook)


def hook_result(hook: Callable[..., object], result: object, current: _T) -> _T:
    """What a hook's (awaited) result means: None keeps `current`, else a replacement.
    Either way it must be writable (InvalidHead, a 502, when it is not); the chain
    checks that a response head keeps the body's framing (filters/chain.py)."""
    if result is None:
        result = current  # the hook may have changed the header list in place
    elif not isinstance(result, type(current)):
        if inspect.iscoroutine(result):
            result.close()  # never awaited: no "coroutine was never awaited" warning later
        raise TypeError(f"hook {_name(hook)!r} returned "
                        f"{type(result).__name__}, expected {type(current).__name__} or None")
    problem = (_plan_problem(result) if isinstance(result, UpstreamPlan)
               else field_problem(result.headers))
    if problem is not None:
        raise InvalidHead(problem, _name(hook))
    return result


def _plan_problem(plan: UpstreamPlan) -> WireError | None:
    method = plan.method.encode("latin-1", "replace") if isinstance(plan.method, str) else b""
    return head_problem(plan.target, plan.headers, method)


async def _settle(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
