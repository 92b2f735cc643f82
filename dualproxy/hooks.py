"""Hooks: user code that sees (and may replace) the core's neutral objects.

A request hook gets the `UpstreamPlan` and returns a replacement plan or None
(keep it); raising a `ProxyError` refuses the request with that status. A
response hook gets the plan and the `ResponseHead` and returns a replacement head
or None. Plain `def` hooks run on both faces, so one config can serve both.
`async def` hooks run on the async face only: the sync face has no event loop,
so `SyncProxy` refuses a config holding one, with a TypeError at construction.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from .core import ResponseHead, UpstreamPlan

RequestHook = Callable[[UpstreamPlan], UpstreamPlan | None | Awaitable[UpstreamPlan | None]]
ResponseHook = Callable[
    [UpstreamPlan, ResponseHead], ResponseHead | None | Awaitable[ResponseHead | None]
]

_T = TypeVar("_T", UpstreamPlan, ResponseHead)


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


def hook_result(hook: Callable[..., object], result: object, current: _T) -> _T:
    """What a hook's (awaited) result means: None keeps `current`, else a replacement."""
    if result is None:
        return current
    if isinstance(result, type(current)):
        return result
    if inspect.iscoroutine(result):
        result.close()  # never awaited: no "coroutine was never awaited" warning later
    raise TypeError(f"hook {getattr(hook, '__qualname__', hook)!r} returned "
                    f"{type(result).__name__}, expected {type(current).__name__} or None")


def run_request_hooks(hooks: Iterable[RequestHook], plan: UpstreamPlan) -> UpstreamPlan:
    """The sync face's hook loop (coroutine results were refused at construction)."""
    for hook in hooks:
        plan = hook_result(hook, hook(plan), plan)
    return plan


def run_response_hooks(hooks: Iterable[ResponseHook], plan: UpstreamPlan,
                       head: ResponseHead) -> ResponseHead:
    for hook in hooks:
        head = hook_result(hook, hook(plan, head), head)
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
    for hook in hooks:
        head = hook_result(hook, await _settle(hook(plan, head)), head)
    return head
