"""Unit tests of the filter chain (filters/chain.py) and the exchange's drivers
(exchange.py): no server, the chain's own rules."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import pytest

from dualproxy.config import ProxyConfig
from dualproxy.core import IncomingRequest, ResponseHead, UpstreamPlan, plan_request
from dualproxy.errors import InvalidHead, TransformFailed
from dualproxy.exchange import drive_async, drive_sync
from dualproxy.filters import Answer, Chain, Exchange, Filter
from dualproxy.filters.chain import (
    BodyPipeline,
    atransformed,
    run_async,
    run_either,
    run_sync,
    transformed,
)
from dualproxy.logs import RequestRecord

CONFIG = ProxyConfig.build("http://upstream.test:8080")


def make_exchange(method: str = "GET", body: bool = False) -> Exchange:
    headers = [(b"host", b"front")]
    if body:
        headers.append((b"content-length", b"3"))
    incoming = IncomingRequest(method=method, target=b"/x", headers=headers, peer="127.0.0.1",
                               scheme="http", mount=b"", http_version="1.1")
    exchange = Exchange(incoming, RequestRecord(incoming))
    exchange.plan = plan_request(CONFIG, incoming)
    return exchange


class Log(Filter):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def on_request(self, exchange: Exchange) -> None:
        self.log.append(f"req {self.name}")

    def on_response(self, exchange: Exchange, head: ResponseHead) -> None:
        self.log.append(f"resp {self.name}")

    def on_end(self, exchange: Exchange) -> None:
        self.log.append(f"end {self.name}")


class Answering(Log):
    def on_request(self, exchange: Exchange) -> Answer:
        super().on_request(exchange)
        return Answer(429, [(b"retry-after", b"1")], b"slow down")


class AsyncLog(Log):
    async def on_request(self, exchange: Exchange) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.log.append(f"areq {self.name}")


def head(*headers: tuple[bytes, bytes], status: int = 200) -> ResponseHead:
    return ResponseHead(status, list(headers), True)


def test_order_request_in_order_response_and_end_in_reverse() -> None:
    log: list[str] = []
    chain = Chain([Log("A", log), Log("B", log), Log("C", log)])
    exchange = make_exchange()
    assert run_sync(chain.request(exchange)) is None
    run_sync(chain.response(exchange, head()))
    run_sync(chain.end(exchange))
    assert log == ["req A", "req B", "req C", "resp C", "resp B", "resp A",
                   "end C", "end B", "end A"]


def test_an_answer_stops_the_chain_and_only_outer_filters_see_it() -> None:
    log: list[str] = []
    chain = Chain([Log("A", log), Answering("B", log), Log("C", log)])
    exchange = make_exchange()
    answer = run_sync(chain.request(exchange))
    assert isinstance(answer, Answer) and answer.status == 429
    run_sync(chain.response(exchange, head(status=429)))
    assert log == ["req A", "req B", "resp A"]


def test_run_async_awaits_async_filters_and_run_sync_refuses_them() -> None:
    log: list[str] = []
    chain = Chain([Log("A", log), AsyncLog("B", log)])
    assert asyncio.run(run_async(chain.request(make_exchange()))) is None
    assert log == ["req A", "areq B"]
    with pytest.raises(TypeError, match="async filter"):
        run_sync(chain.request(make_exchange()))
    with pytest.raises(TypeError, match="AsyncLog|B.on_request"):
        chain.require_sync()


def test_the_exchange_drivers_perform_the_same_flow() -> None:
    """A flow yields what a port call returned: a value (sync) or an awaitable."""
    def flow(port: Any) -> Any:
        first = yield port(1)
        try:
            yield port(-1)
        except ValueError as exc:
            return first, str(exc)
        raise AssertionError("the failing action did not raise in the flow")

    def sync_port(n: int) -> int:
        if n < 0:
            raise ValueError("negative")
        return n * 10

    async def async_port(n: int) -> int:
        await asyncio.sleep(0)
        return sync_port(n)

    assert drive_sync(flow(sync_port)) == (10, "negative")
    assert asyncio.run(drive_async(flow(async_port))) == (10, "negative")


def test_a_plan_left_unwritable_is_invalid_head_naming_the_filter() -> None:
    class Smuggle(Filter):
        def on_request(self, exchange: Exchange) -> None:
            assert exchange.plan is not None
            exchange.plan.headers.append((b"x-bad", b"a\r\nb"))

    with pytest.raises(InvalidHead) as info:
        run_sync(Chain([Smuggle()]).request(make_exchange()))
    assert "Smuggle" in (info.value.log_detail or "")


def test_a_filter_may_not_reframe_a_body_it_does_not_transform() -> None:
    class Reframe(Filter):
        def on_response(self, exchange: Exchange, head: ResponseHead) -> None:
            head.headers[:] = [(n, v) for n, v in head.headers if n != b"content-length"]
            head.headers.append((b"content-length", b"999"))

    with pytest.raises(InvalidHead):
        run_sync(Chain([Reframe()]).response(make_exchange(),
                                             head((b"content-length", b"5"))))


class Upper:
    def feed(self, chunk: bytes) -> bytes:
        return chunk.upper()

    def finish(self) -> bytes:
        return b"!"


class Holding:
    """Holds everything back until the end (a buffered edit)."""

    def __init__(self) -> None:
        self.kept = b""

    def feed(self, chunk: bytes) -> bytes:
        self.kept += chunk
        return b""

    def finish(self) -> bytes:
        return b"<" + self.kept + b">"


def test_a_length_changing_transform_drops_content_length_and_weakens_the_etag() -> None:
    class Transforming(Filter):
        def on_response(self, exchange: Exchange, head: ResponseHead) -> None:
            assert exchange.transform_response(Upper())

    final = run_sync(Chain([Transforming()]).response(
        make_exchange(), head((b"content-length", b"5"), (b"etag", b'"v1"'))))
    assert (b"content-length", b"5") not in final.headers
    assert (b"etag", b'W/"v1"') in final.headers


@pytest.mark.parametrize("status,method", [(206, "GET"), (304, "GET"), (204, "GET"),
                                           (200, "HEAD")])
def test_no_transform_on_206_304_204_or_head(status: int, method: str) -> None:
    installed: list[bool] = []

    class Transforming(Filter):
        def on_response(self, exchange: Exchange, head: ResponseHead) -> None:
            installed.append(exchange.transform_response(Upper()))

    final = run_sync(Chain([Transforming()]).response(
        make_exchange(method), head((b"content-length", b"5"), (b"etag", b'"v1"'),
                                    status=status)))
    assert installed == [False]
    assert (b"content-length", b"5") in final.headers
    assert (b"etag", b'"v1"') in final.headers


def test_decode_unwraps_gzip_and_drops_content_encoding() -> None:
    class Decoding(Filter):
        def on_response(self, exchange: Exchange, head: ResponseHead) -> None:
            assert exchange.transform_response(Upper(), decode=True)

    exchange = make_exchange()
    final = run_sync(Chain([Decoding()]).response(
        exchange, head((b"content-encoding", b"gzip"), (b"content-length", b"40"))))
    assert not any(n == b"content-encoding" for n, _ in final.headers)
    pipeline = exchange._response_pipeline
    packed = gzip.compress(b"hello gzip")
    assert b"".join(transformed(pipeline, [packed[:7], packed[7:]])) == b"HELLO GZIP!"


def test_body_pipeline_finish_cascades_through_every_transform() -> None:
    """What an earlier transform releases at its finish still goes through the later
    ones (fed, then finished): nothing held back is lost or left untransformed."""
    pipeline = BodyPipeline()
    pipeline.transforms = [Holding(), Upper()]
    assert pipeline.feed(b"ab") == b""
    assert pipeline.feed(b"cd") == b""
    assert pipeline.finish() == b"<ABCD>!"


def test_run_either_gives_a_value_or_a_coroutine_for_the_rest() -> None:
    def flow(awaits: bool) -> Any:
        got = yield asyncio.sleep(0, "slept") if awaits else None
        return got

    def plain() -> Any:
        return "plain"
        yield  # a generator that never yields

    assert run_either(plain()) == "plain"  # nothing to await: no coroutine
    pending = run_either(flow(True))
    assert asyncio.iscoroutine(pending) and asyncio.run(pending) == "slept"


class Storing:
    """A transform that hands the relay an awaitable at its finish (a cache's write)."""

    def __init__(self, exchange: Exchange, log: list[str]) -> None:
        self.exchange, self.log = exchange, log

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        async def write() -> None:
            await asyncio.sleep(0)
            self.log.append("stored")

        self.exchange.await_in_body(write())
        return b"!"


def test_await_in_body_is_awaited_before_the_last_bytes_and_refused_on_the_sync_face(
        ) -> None:
    log: list[str] = []

    class Observing(Filter):
        def on_response(self, exchange: Exchange, head: ResponseHead) -> None:
            assert exchange.transform_response(Storing(exchange, log), same_length=True)

    async def relay(pipeline: BodyPipeline | None) -> None:
        async def body() -> Any:
            yield b"ab"

        async for chunk in atransformed(pipeline, body()):
            log.append(chunk.decode())

    exchange = make_exchange()
    run_sync(Chain([Observing()]).response(exchange, head()))
    asyncio.run(relay(exchange._response_pipeline))
    assert log == ["ab", "stored", "!"]  # the write is done before the tail goes on
    exchange = make_exchange()
    run_sync(Chain([Observing()]).response(exchange, head()))
    with pytest.raises(TransformFailed, match="sync face"):
        list(transformed(exchange._response_pipeline, [b"ab"]))


def test_a_failing_transform_is_transform_failed() -> None:
    class Broken:
        def feed(self, chunk: bytes) -> bytes:
            raise ValueError("boom")

        def finish(self) -> bytes:
            return b""

    pipeline = BodyPipeline()
    pipeline.transforms = [Broken()]
    with pytest.raises(TransformFailed, match="boom"):
        pipeline.feed(b"x")


def test_a_request_transform_makes_the_upstream_request_chunked() -> None:
    exchange = make_exchange("POST", body=True)
    assert exchange.transform_request(Upper())
    plan = exchange.plan
    assert isinstance(plan, UpstreamPlan)
    assert (b"transfer-encoding", b"chunked") in plan.headers
    assert not any(n == b"content-length" for n, _ in plan.headers)
    assert plan.content_length is None
    assert not make_exchange("GET").transform_request(Upper())  # no body: nothing to do


def test_on_end_failures_are_logged_and_the_others_still_run() -> None:
    log: list[str] = []

    class Failing(Filter):
        def on_end(self, exchange: Exchange) -> None:
            raise RuntimeError("on_end broke")

    run_sync(Chain([Log("A", log), Failing(), Log("C", log)]).end(make_exchange()))
    assert log == ["end C", "end A"]


class _Tries:
    """What exchange.attempts needs of a face: a pool of two upstreams, retry once."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.config = ProxyConfig.build(["http://a.test:1", "http://b.test:2"])

    def choose(self, record: Any) -> Any:
        return self.config.upstreams[0]

    def retry(self, record: Any, plan: Any, tried: list[Any], exc: BaseException) -> Any:
        if tried:
            return None
        tried.append(self.config.upstreams[0])
        return self.config.upstreams[1]


class Tracer(Filter):
    """Marks each try's request with its number, and notes how each try ended."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def on_attempt(self, exchange: Exchange, attempt: Any) -> None:
        assert exchange.plan is not None
        exchange.plan.headers[:] = [(n, v) for n, v in exchange.plan.headers if n != b"x-try"]
        exchange.plan.headers.append((b"x-try", b"%d" % attempt.number))
        self.log.append(f"try {attempt.number} {attempt.upstream.host}")

    def on_attempt_end(self, exchange: Exchange, attempt: Any) -> None:
        self.log.append(f"end {attempt.number} {type(attempt.error).__name__}")


class AsyncTracer(Tracer):
    async def on_attempt(self, exchange: Exchange, attempt: Any) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().on_attempt(exchange, attempt)


@pytest.mark.parametrize("face", ["sync", "async"])
def test_attempt_hooks_see_each_try_and_its_headers(face: str) -> None:
    from dualproxy.exchange import attempts

    log: list[str] = []
    exchange = make_exchange()
    sent: list[bytes] = []

    def attempt(upstream: Any) -> str:
        assert exchange.plan is not None
        sent.append(dict(exchange.plan.headers)[b"x-try"])
        if upstream.host == "a.test":
            raise ConnectionRefusedError("no")
        return "answer"

    async def async_attempt(upstream: Any) -> str:
        await asyncio.sleep(0)
        return attempt(upstream)

    tries = _Tries(Chain([(Tracer if face == "sync" else AsyncTracer)(log)]))
    flow = attempts(tries, exchange.record, exchange.plan,  # type: ignore[arg-type]
                    attempt if face == "sync" else async_attempt, exchange)
    result = drive_sync(flow) if face == "sync" else asyncio.run(drive_async(flow))
    assert result == "answer"
    assert sent == [b"0", b"1"]  # each try carried its own header
    assert log == ["try 0 a.test", "end 0 ConnectionRefusedError", "try 1 b.test",
                   "end 1 NoneType"]
    with pytest.raises(TypeError, match="AsyncTracer.on_attempt"):
        Chain([AsyncTracer([])]).require_sync()


def test_a_try_header_left_unwritable_is_invalid_head() -> None:
    from dualproxy.exchange import attempts

    class Smuggle(Filter):
        def on_attempt(self, exchange: Exchange, attempt: Any) -> None:
            assert exchange.plan is not None
            exchange.plan.headers.append((b"traceparent", b"a\r\nb"))

    exchange = make_exchange()
    face = _Tries(Chain([Smuggle()]))
    with pytest.raises(InvalidHead):
        drive_sync(attempts(face, exchange.record, exchange.plan,  # type: ignore[arg-type]
                            lambda upstream: "answer", exchange))
