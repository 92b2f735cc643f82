"""Hooks as filters: a hook is the oldest kind of filter. The chain (chain.py) runs
it at its stage, and what it leaves is checked by the hooks' rule (hooks.py)."""

from __future__ import annotations

from collections.abc import Iterable

from ..core import ResponseHead
from ..hooks import RequestHook, ResponseHook, _name, _settle, hook_result, is_async_hook
from .base import Exchange, Filter


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
