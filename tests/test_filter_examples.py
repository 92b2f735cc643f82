"""The filter examples (examples/filters/, shown in docs/filters.md), each started with the
command its docstring gives, in front of the recording upstream: they cannot rot.

Not parametrized over pairings (each example has its natural server, as the other
examples in tests/test_integrations.py); the filters on every pairing:
tests/test_body_transforms.py.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.conftest import ROOT
from tests.rawhttp import RawResponse, exchange, request_bytes
from tests.test_integrations import App, gunicorn, uvicorn
from tests.upstream import Upstream

EXAMPLES = ROOT / "examples" / "filters"


def started(name: str, upstream: Upstream) -> App:
    """The example run as its docstring says (uvicorn or gunicorn)."""
    command = re.search(r"^\s+(uvicorn|gunicorn) (.*)$", module_doc(name), re.M)
    assert command is not None, f"{name}: no uvicorn/gunicorn command in its docstring"
    server, args = command[1], command[2].split()
    target = next(a for a in args if a.startswith("examples."))
    extra = [a for a in args if a != target]
    return (uvicorn if server == "uvicorn" else gunicorn)(target, upstream, *extra)


def module_doc(name: str) -> str:
    text = (EXAMPLES / f"{name}.py").read_text()
    return text.split('"""')[1]


@pytest.fixture
def example(request: pytest.FixtureRequest, upstream: Upstream) -> Iterator[App]:
    app = started(request.param, upstream)
    yield app
    app.stop()


def pieces(app: App, rid: str, parts: list[bytes], params: str) -> RawResponse:
    response = exchange(app.port, request_bytes("GET", f"/x/{rid}", [
        ("x-req-id", rid), ("x-upstream", f"pieces interval=0.05 {params}"),
        ("x-upstream-pieces", json.dumps([base64.b64encode(p).decode() for p in parts]))]))
    assert response.status == 200 and response.complete, response
    return response


def test_every_example_has_a_test() -> None:
    names = {path.stem for path in EXAMPLES.glob("*.py") if path.stem != "__init__"}
    assert names == set(CHECKS)


def check_sub_filter(app: App, upstream: Upstream, rid: str) -> None:
    page = f'<a href="{upstream.url}/docs">docs</a>'.encode()
    cut = page.index(b"//") + 5
    response = pieces(app, rid, [page[:cut], page[cut:]], "ctype=text/html")
    assert response.body == b'<a href="http://127.0.0.1:8000/docs">docs</a>'


def check_json_edit(app: App, upstream: Upstream, rid: str) -> None:
    document = gzip.compress(json.dumps({"id": 1, "_internal": "x", "name": "n"}).encode())
    response = pieces(app, rid, [document[:9], document[9:]],
                      "ctype=application/json encoding=gzip")
    assert json.loads(response.body) == {"id": 1, "name": "n"}
    assert response.header("content-encoding") is None


def check_drop_lines(app: App, upstream: Upstream, rid: str) -> None:
    response = pieces(app, rid, [b"one\nthe pass", b"word is x\nthree\nPASSWORD=y"],
                      "ctype=text/plain chunked=1")
    assert response.body == b"one\nthree\n"


def check_tabs_to_spaces(app: App, upstream: Upstream, rid: str) -> None:
    body = zstandard.ZstdCompressor().compress(b"a\tb\n\tc\n")
    response = pieces(app, rid, [body[:6], body[6:]], "ctype=text/plain encoding=zstd")
    assert response.body == b"a    b\n    c\n"
    assert response.header("content-encoding") is None


def check_request_body(app: App, upstream: Upstream, rid: str) -> None:
    response = exchange(app.port, request_bytes("POST", f"/in/{rid}", [
        ("x-req-id", rid), ("Content-Type", "text/csv")], b"a,b\r\nc,d\r\n"))
    assert response.status == 200
    assert upstream.wait_record(rid).body == b"a,b\nc,d\n"


def check_traced(app: App, upstream: Upstream, rid: str) -> None:
    response = exchange(app.port, request_bytes("GET", f"/api/{rid}", [("x-req-id", rid)]))
    assert response.status == 200
    [sent] = upstream.wait_record(rid).header_all("traceparent")
    trace_id, parent_id = sent.split("-")[1:3]
    deadline = time.monotonic() + 10
    spans: list[dict[str, Any]] = []
    while len(spans) < 2 and time.monotonic() < deadline:
        spans = [json.loads(line) for line in app.log().splitlines()
                 if line.startswith("{") and trace_id in line]
        time.sleep(0.05)
    names = {span["name"]: span for span in spans}
    assert set(names) == {"GET /api", "GET"}, app.log()
    assert names["GET"]["context"]["span_id"] == f"0x{parent_id}"
    assert names["GET /api"]["resource"]["attributes"]["service.name"] == "traced-example"


CHECKS: dict[str, Callable[[App, Upstream, str], None]] = {
    "sub_filter": check_sub_filter,
    "json_edit": check_json_edit,
    "drop_lines": check_drop_lines,
    "tabs_to_spaces": check_tabs_to_spaces,
    "request_body": check_request_body,
    "traced": check_traced,
}


@pytest.mark.parametrize("example", sorted(CHECKS), indirect=True)
def test_example(example: App, upstream: Upstream, rid: str, request: pytest.FixtureRequest
                 ) -> None:
    name = request.node.callspec.params["example"]
    CHECKS[name](example, upstream, rid)


def test_the_filters_page_shows_every_example() -> None:
    # the tracing example is shown on the tracing page
    page = (ROOT / "docs" / "filters.md").read_text() + (ROOT / "docs" / "tracing.md").read_text()
    for name in CHECKS:
        assert f'--8<-- "examples/filters/{name}.py"' in page, name
    assert Path(EXAMPLES / "__init__.py").exists()


def test_the_filters_page_code_blocks_run() -> None:
    """Each complete block of docs/filters.md (one that imports) builds its app."""
    page = (ROOT / "docs" / "filters.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", page, re.S)
              if "import" in b and "--8<--" not in b]
    assert len(blocks) >= 2
    for block in blocks:
        namespace: dict[str, object] = {"__name__": "docs_block"}
        exec(compile(block, "docs/filters.md", "exec"), namespace)  # noqa: S102
        assert namespace.get("app") is not None, block
