"""`dualproxy serve` with Python-defined body transforms, for the tests of every pairing.

    python -m tests.filter_serve serve --upstream URL --adapter wsgi --server gunicorn ...

The route's `filters=` holds one filter of each kind from dualproxy.filters; the
request header `x-filter: NAME` chooses which one runs for a request (the others
leave it alone), so one proxy process serves every test of tests/test_body_transforms.py.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from dualproxy import cli, launch
from dualproxy.config import ProxyConfig
from dualproxy.core import ResponseHead
from dualproxy.filters import (
    Answer,
    Buffered,
    Exchange,
    Filter,
    SubFilter,
    body_filter,
    request_body_filter,
)

LIMIT = 64  # the Buffered filters' limit, in bytes


class Selected(Filter):
    """`inner`, for the requests whose `x-filter` header names it."""

    def __init__(self, key: str, inner: Filter) -> None:
        self.key = key.encode()
        self.inner = inner
        self.name = f"{key}:{inner.label()}"

    def _chosen(self, exchange: Exchange) -> bool:
        return (b"x-filter", self.key) in exchange.incoming.headers

    def on_request(self, exchange: Exchange) -> object:
        return self.inner.on_request(exchange) if self._chosen(exchange) else None

    def on_response(self, exchange: Exchange, head: ResponseHead) -> object:
        return self.inner.on_response(exchange, head) if self._chosen(exchange) else None


def add_via(document: bytes) -> bytes:
    """The JSON edit: a field added to the upstream's object."""
    return json.dumps({**json.loads(document), "via": "dualproxy"}).encode()


class AnswerPage(Filter):
    """Answers by itself with a page in two chunks, cut inside the upstream's URL."""

    def on_request(self, exchange: Exchange) -> Answer:
        return Answer(200, [(b"content-type", b"text/html")],
                      [b'<a href="http://upst', b'ream:8080/">home</a>'])


SUB = {"http://upstream:8080": "https://public.example", "upstream:8080": "public.example"}

FILTERS = (
    # A SubFilter outside a filter that answers: the answer's body is rewritten too.
    Selected("answered", SubFilter(SUB)),
    Selected("answered", AnswerPage()),
    Selected("sub", SubFilter(SUB)),
    Selected("upper", body_filter(bytes.upper, types="text/plain", decode=True)),
    Selected("json", Buffered(add_via, limit=LIMIT, types="application/json")),
    Selected("buffered", Buffered(lambda whole: b"edited", limit=LIMIT, types="text/plain")),
    Selected("request", request_body_filter(bytes.upper, types="text/plain")),
)


def _with_filters(options: dict[str, object]) -> ProxyConfig:
    return dataclasses.replace(_config_from_options(options), filters=FILTERS)


_config_from_options = launch.config_from_options
launch.config_from_options = _with_filters

if __name__ == "__main__":
    sys.exit(cli.main())
