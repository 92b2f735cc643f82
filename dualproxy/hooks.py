"""Hook signatures: user code that sees (and may replace) the core's neutral objects.

A request hook gets the `UpstreamPlan` and returns a replacement plan or None
(keep it); raising a `ProxyError` refuses the request with that status. A
response hook gets the plan and the `ResponseHead` and returns a replacement head
or None. The sync face calls hooks directly; the async face awaits the result
when a hook is a coroutine function, so one config can serve both faces.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from .core import ResponseHead, UpstreamPlan

RequestHook = Callable[
    ["UpstreamPlan"], Union["UpstreamPlan", None, Awaitable[Union["UpstreamPlan", None]]]
]
ResponseHook = Callable[
    ["UpstreamPlan", "ResponseHead"],
    Union["ResponseHead", None, Awaitable[Union["ResponseHead", None]]],
]
