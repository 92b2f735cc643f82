"""`dualproxy serve` with a chain of probe filters, for tests/test_filters.py on every pairing.

    python -m tests.chain_serve serve --upstream URL --adapter wsgi --server gunicorn ...

Three probes A, B, C (outermost first), then a request and a response hook. What
each probe does is chosen per request by its `x-filter-test` header (a space-
separated list of scenarios), so one proxy process serves every test:

  order      each probe adds `x-order: <name>` upstream and `x-order-down: <name>` down
  answer     B answers alone: 203 `answered by B` (A sees it and adds its header)
  upper-req  C upper-cases the request body
  upper-resp C upper-cases the response body
  observe    C installs a same-length observer on the response body
  raise-mid  C's response transform raises at its second chunk
  refuse     B raises ProxyError 429
  rescue     A answers an upstream failure (on_error) with 200 `rescued: <status>`
  end        each probe prints `FILTER-END <json>` (status, bytes, outcome) at on_end

`x-filter-id` names the request in the FILTER-END line.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from dualproxy import cli, launch
from dualproxy.config import ProxyConfig
from dualproxy.core import ResponseHead, UpstreamPlan
from dualproxy.errors import ProxyError
from dualproxy.filters import Answer, Exchange, Filter


def scenarios(exchange: Exchange) -> list[str]:
    for name, value in exchange.incoming.headers:
        if name == b"x-filter-test":
            return value.decode("latin-1").split()
    return []


class Upper:
    """Upper-cases a body as it streams (a length-keeping edit, declared as changing)."""

    def feed(self, chunk: bytes) -> bytes:
        return chunk.upper()

    def finish(self) -> bytes:
        return b""


class Observer:
    """Counts bytes, changes none (same_length)."""

    def __init__(self) -> None:
        self.seen = 0

    def feed(self, chunk: bytes) -> bytes:
        self.seen += len(chunk)
        return chunk

    def finish(self) -> bytes:
        return b""


class RaiseAtSecond:
    def __init__(self) -> None:
        self.chunks = 0

    def feed(self, chunk: bytes) -> bytes:
        self.chunks += 1
        if self.chunks >= 2:
            raise ValueError("the transform broke mid-body")
        return chunk

    def finish(self) -> bytes:
        return b""


class Probe(Filter):
    def __init__(self, name: str) -> None:
        self.name = name

    def on_request(self, exchange: Exchange) -> Answer | None:
        tests = scenarios(exchange)
        plan = exchange.plan
        assert plan is not None
        if "order" in tests:
            plan.headers.append((b"x-order", self.name.encode()))
        if self.name == "B" and "refuse" in tests:
            raise ProxyError("too many requests from this filter", status=429)
        if self.name == "B" and "answer" in tests:
            return Answer(203, [(b"content-type", b"text/plain"),
                                (b"x-answered-by", b"B")], b"answered by B")
        if self.name == "C" and "upper-req" in tests:
            exchange.transform_request(Upper())
        return None

    def on_response(self, exchange: Exchange, head: ResponseHead) -> ResponseHead | None:
        tests = scenarios(exchange)
        if "order" in tests:
            head.headers.append((b"x-order-down", self.name.encode()))
        if self.name == "C":
            installed = None
            if "upper-resp" in tests:
                installed = exchange.transform_response(Upper())
            elif "observe" in tests:
                installed = exchange.transform_response(Observer(), same_length=True)
            elif "raise-mid" in tests:
                installed = exchange.transform_response(RaiseAtSecond())
            if installed is not None:
                head.headers.append((b"x-transformed", b"yes" if installed else b"no"))
        return None

    def on_error(self, exchange: Exchange, error: ProxyError) -> Answer | None:
        if self.name == "A" and "rescue" in scenarios(exchange):
            return Answer(200, [(b"content-type", b"text/plain")],
                          f"rescued: {error.status}".encode())
        return None

    def on_end(self, exchange: Exchange) -> None:
        if "end" not in scenarios(exchange):
            return
        record = exchange.record
        rid = next((v.decode() for n, v in exchange.incoming.headers if n == b"x-filter-id"),
                   "")
        outcome, _ = record.ending()
        print("FILTER-END " + json.dumps({
            "rid": rid, "filter": self.name, "status": record.status,
            "bytes_out": record.bytes_out, "bytes_in": record.bytes_in,
            "outcome": outcome, "websocket": record.websocket}),
            file=sys.stderr, flush=True)


def hook_up(plan: UpstreamPlan) -> UpstreamPlan:
    return dataclasses.replace(plan, headers=[*plan.headers, (b"x-hook", b"request")])


def hook_down(plan: UpstreamPlan, head: ResponseHead) -> None:
    head.headers.append((b"x-hook", b"response"))


def _with_filters(options: dict[str, object]) -> ProxyConfig:
    return dataclasses.replace(_config_from_options(options),
                               filters=(Probe("A"), Probe("B"), Probe("C")),
                               request_hooks=(hook_up,), response_hooks=(hook_down,))


_config_from_options = launch.config_from_options
launch.config_from_options = _with_filters

if __name__ == "__main__":
    sys.exit(cli.main())
