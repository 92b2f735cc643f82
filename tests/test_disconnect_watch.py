"""The ASGI face's disconnect watch on receive() (asgi.DisconnectWatch), for servers
that offer no ON_GONE (granian): a bodiless exchange starts it only after
WATCH_DELAY, so a quick one never calls receive(), and a slow one still sees the
client leave."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from dualproxy.asgi import WATCH_DELAY, DisconnectWatch


class Receive:
    """receive() as granian's: a future a call; the first hands over the empty body,
    the second the disconnect after `gone_after` seconds."""

    def __init__(self, gone_after: float) -> None:
        self.calls = 0
        self.gone_after = gone_after

    def __call__(self) -> asyncio.Future[dict[str, Any]]:
        self.calls += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        if self.calls == 1:
            future.set_result({"type": "http.request", "body": b"", "more_body": False})
        else:
            loop.call_later(self.gone_after, future.set_result, {"type": "http.disconnect"})
        return future


def test_a_quick_bodiless_exchange_never_calls_receive() -> None:
    async def main() -> int:
        receive = Receive(gone_after=0)
        record = SimpleNamespace(responded=False, client_gone=False)
        task = asyncio.current_task()
        assert task is not None
        watch = DisconnectWatch(receive, record, task)  # type: ignore[arg-type]
        watch.start_soon()
        await asyncio.sleep(WATCH_DELAY / 4)  # the exchange, done before the delay
        record.responded = True
        watch.cancel()
        await asyncio.sleep(WATCH_DELAY * 3)  # past the delay: nothing starts
        assert not record.client_gone
        return receive.calls

    assert asyncio.run(main()) == 0


def test_a_slow_bodiless_exchange_sees_the_client_leave() -> None:
    async def main() -> tuple[bool, int, float]:
        receive = Receive(gone_after=0.05)
        record = SimpleNamespace(responded=False, client_gone=False)
        loop = asyncio.get_running_loop()
        began = loop.time()

        async def exchange() -> None:
            task = asyncio.current_task()
            assert task is not None
            DisconnectWatch(receive, record, task).start_soon()  # type: ignore[arg-type]
            await asyncio.sleep(5)  # an upstream that takes its time

        task = asyncio.ensure_future(exchange())
        try:
            await task
        except asyncio.CancelledError:
            pass
        return record.client_gone, receive.calls, loop.time() - began

    gone, calls, took = asyncio.run(main())
    assert gone and calls == 2
    assert took < WATCH_DELAY + 0.05 + 1.0  # seen at once, not after the upstream's 5 s
