"""The house rules: server internals are gated on tested versions, and arrows point down.

Unit tests, no pairing: the speed-ups that lean on gunicorn's or uvicorn's private
internals run only on the releases declared in pyproject.toml's `servers` extra and
fall back otherwise; and no module imports from a layer above its own.
"""

from __future__ import annotations

import ast
import io
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dualproxy import servers
from dualproxy.servers import gunicorn_body, uvicorn

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dualproxy"


def _declared_range(dist: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    text = (ROOT / "pyproject.toml").read_text()
    extra = re.search(r"^servers = \[(.*?)\n\]", text, re.S | re.M)
    assert extra is not None
    spec = re.search(rf'"{dist}(?:\[[a-z]+\])?>=([\d.]+),<([\d.]+)"', extra[1])
    assert spec is not None, f"{dist} has no >=,< range in the servers extra"
    low, high = (tuple(int(p) for p in v.split(".")) for v in spec.groups())
    return low, high


@pytest.mark.parametrize("dist", sorted(servers.TESTED))
def test_gates_and_the_servers_extra_declare_the_same_ranges(dist: str) -> None:
    assert servers.TESTED[dist] == _declared_range(dist)


@pytest.mark.parametrize("dist", sorted(servers.TESTED))
def test_the_suite_runs_on_tested_releases(dist: str) -> None:
    assert servers.is_tested(dist), (dist, servers.installed_version(dist))


@pytest.fixture
def untested(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend every server is a release the suite never ran on."""
    monkeypatch.setattr(servers, "installed_version", lambda dist: (999,))


def test_uvicorn_tuning_runs_on_tested_releases_only(monkeypatch: pytest.MonkeyPatch,
                                                     untested: None) -> None:
    import uvicorn.protocols.http.h11_impl as h11_impl

    monkeypatch.setattr(h11_impl, "HIGH_WATER_LIMIT", 65536)
    uvicorn.tune_uvicorn()
    assert vars(h11_impl)["HIGH_WATER_LIMIT"] == 65536  # untouched on an untested release
    monkeypatch.undo()
    monkeypatch.setattr(h11_impl, "HIGH_WATER_LIMIT", 65536)
    uvicorn.tune_uvicorn()
    assert vars(h11_impl)["HIGH_WATER_LIMIT"] == uvicorn.UVICORN_BODY_HIGH_WATER


@pytest.fixture
def gunicorn_body_of() -> Iterator[Callable[[bytes], Any]]:
    """gunicorn's own wsgi.input for a Content-Length body, over a socket pair."""
    from gunicorn.http.body import Body, LengthReader
    from gunicorn.http.unreader import SocketUnreader

    sockets: list[socket.socket] = []

    def make(data: bytes) -> Any:
        ours, theirs = socket.socketpair()
        sockets.extend((ours, theirs))
        theirs.sendall(data)
        theirs.close()
        return Body(LengthReader(SocketUnreader(ours), len(data)))

    yield make
    for sock in sockets:
        sock.close()


def test_gunicorn_direct_upload_path_on_tested_releases_only(
        gunicorn_body_of: Callable[[bytes], Any], untested: None) -> None:
    body = gunicorn_body_of(b"hello")
    assert gunicorn_body.GunicornLengthInput.recognise(body) is None  # wsgi.input is read
    assert body.read(5) == b"hello"


def test_the_wsgi_face_gets_gunicorns_reader_through_the_registry(
        gunicorn_body_of: Callable[[bytes], Any]) -> None:
    """The server layer offers its reader (body_input.py); the face asks the registry."""
    from dualproxy import body_input

    assert body_input.read_size(object(), 4096) == 4096
    reader = body_input.body_reader({"wsgi.input": gunicorn_body_of(b"hello")})
    assert isinstance(reader, gunicorn_body.GunicornLengthInput)  # registered on import
    assert body_input.read_size(reader, 4096) == gunicorn_body.DIRECT_READ
    other = io.BytesIO(b"x")
    assert body_input.body_reader({"wsgi.input": other}) is other


def test_the_wsgi_face_imports_no_server_module() -> None:
    wsgi = PACKAGE / "wsgi.py"
    assert not {name for name in _imported(wsgi) if name == "servers"}


def test_gunicorn_direct_upload_path_reads_the_body(
        gunicorn_body_of: Callable[[bytes], Any]) -> None:
    direct = gunicorn_body.GunicornLengthInput.recognise(gunicorn_body_of(b"hello world"))
    assert direct is not None
    pieces = [direct.read(4) for _ in range(4)]
    assert pieces == [b"hell", b"o wo", b"rld", b""]


# --- arrows point down ---------------------------------------------------------------------

# Lower numbers are lower layers; a module may import its own layer and those below.
LAYERS = {
    0: {"types", "upstreams", "config", "errors", "target", "framing", "headers", "core", "hooks",
        "logs", "routes", "balancer", "wire", "rules", "rates", "waits"},
    1: {"servers", "http1", "metrics", "drain", "filters", "body_input"},
    2: {"face", "exchange", "asgi", "wsgi", "websocket", "router", "health", "pools"},
    3: {"flask", "fastapi", "bridge", "workers"},
    4: {"cli", "launch", "configfile", "demo", "__main__", "__init__"},
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def _top(module: Path) -> str:
    parts = module.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _nodes(tree: ast.AST, runtime_only: bool) -> Iterator[ast.AST]:
    """Every node, less the `if TYPE_CHECKING:` blocks when `runtime_only`."""
    for node in ast.iter_child_nodes(tree):
        if runtime_only and isinstance(node, ast.If) and ast.unparse(node.test).endswith(
                "TYPE_CHECKING"):
            continue
        yield node
        yield from _nodes(node, runtime_only)


def _imported(module: Path, runtime_only: bool = False) -> set[str]:
    """The dualproxy top-level modules `module` imports (relative or absolute)."""
    tree = ast.parse(module.read_text())
    depth = len(module.relative_to(PACKAGE).parts)  # 1 at the top, 2 in a subpackage
    names: set[str] = set()
    for node in _nodes(tree, runtime_only):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level < depth:
                    names.add(_top(module))  # the module's own subpackage
                    continue
                targets = [node.module] if node.module else [a.name for a in node.names]
            elif node.module and node.module.startswith("dualproxy."):
                targets = [node.module.removeprefix("dualproxy.")]
            else:
                continue
            names.update(t.split(".")[0] for t in targets if t)
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("dualproxy."))
    return names


def test_every_module_has_a_layer() -> None:
    missing = {_top(m) for m in PACKAGE.rglob("*.py")} - set(LAYER_OF)
    assert not missing


@pytest.mark.parametrize("module", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.name))
def test_imports_point_down(module: Path) -> None:
    own = LAYER_OF[_top(module)]
    upward = {name for name in _imported(module) if LAYER_OF.get(name, 0) > own}
    assert not upward, f"{module.relative_to(ROOT)} imports from a higher layer: {upward}"


def test_the_core_imports_no_face_server_or_transport() -> None:
    for name in LAYERS[0]:
        package = PACKAGE / name
        modules = sorted(package.rglob("*.py")) if package.is_dir() else [
            PACKAGE / f"{name}.py"]
        imported = set().union(*(_imported(module) for module in modules))
        assert imported <= LAYERS[0], (name, imported - LAYERS[0])


def test_no_import_cycles() -> None:
    """No two modules import each other, even lazily (`cli` and `demo` used to)."""
    graph: dict[str, set[str]] = {_top(m): set() for m in PACKAGE.rglob("*.py")
                                  if _top(m) != "__init__"}
    for module in PACKAGE.rglob("*.py"):
        if _top(module) in graph:
            graph[_top(module)] |= _imported(module, runtime_only=True) - {_top(module)}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for name in graph.get(start, ()):
            if name == goal or (name not in seen and reaches(name, goal, seen | {name})):
                return True
        return False

    cycles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not cycles


def test_servers_stay_unimported_until_used() -> None:
    """Importing the faces loads no server package (gunicorn, uvicorn) by itself."""
    code = ("import sys, dualproxy.asgi, dualproxy.wsgi;"
            "print(sorted(m for m in ('gunicorn', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True, cwd=ROOT).stdout.strip()
    assert out == "[]"


def test_granian_runs_on_tested_releases_only(untested: None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """servers/granian.py leans on granian's private worker signal set-up: another
    release is a one-line usage error, before anything starts."""
    from dualproxy.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", "--upstream", "http://127.0.0.1:9", "--server", "granian"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "granian >=2.8,<2.9" in err and "found 999" in err, err


# --- uvicorn: a response's head goes out with its body ----------------------------------------

class _Transport:
    """What CorkedTransport needs of a transport, recording each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, pieces: Any) -> None:
        self.writes.append(b"".join(pieces))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return name


def test_a_head_goes_out_with_the_first_body_piece_or_at_the_next_turn() -> None:
    import asyncio

    from dualproxy.servers.uvicorn_protocols import CorkedTransport

    async def run() -> None:
        loop = asyncio.get_running_loop()
        raw = _Transport()
        corked = CorkedTransport(raw, loop)
        corked.write(b"HEAD\r\n\r\n")
        corked.write(b"body")
        corked.write(b"more" * 10000)
        assert raw.writes == [b"HEAD\r\n\r\nbody", b"more" * 10000]  # one send, then as is
        await asyncio.sleep(0)
        assert len(raw.writes) == 2  # the scheduled flush found nothing held

        raw = _Transport()
        corked = CorkedTransport(raw, loop)
        corked.write(b"HEAD\r\n\r\n")  # a stream's head, its body not in yet
        assert raw.writes == []
        await asyncio.sleep(0)
        assert raw.writes == [b"HEAD\r\n\r\n"]  # not kept past the loop's next turn

        raw = _Transport()
        corked = CorkedTransport(raw, loop)
        corked.hold(b"HEAD\r\n\r\n")  # the app said the body comes next: no callback
        await asyncio.sleep(0)
        assert raw.writes == []
        corked.write(b"")  # an empty body message (the app must wait): the head alone
        assert raw.writes == [b"HEAD\r\n\r\n"]
        corked.hold(b"late")  # not the first write: written as any
        assert raw.writes == [b"HEAD\r\n\r\n", b"late"]

        for last in ("close", "get_extra_info"):  # anything else: the head first
            raw = _Transport()
            corked = CorkedTransport(raw, loop)
            corked.write(b"HEAD\r\n\r\n")
            getattr(corked, last)(*(("x",) if last == "get_extra_info" else ()))
            assert raw.writes == [b"HEAD\r\n\r\n"]

    asyncio.run(run())


# --- uvicorn: the keep-alive timeout, on a lazy timer ---------------------------------------

def test_an_idle_keep_alive_connection_closes_at_uvicorns_timeout() -> None:
    """uvicorn closes a keep-alive connection `timeout_keep_alive` seconds after its last
    response when no byte came meanwhile; dualproxy's protocol keeps that timeout on one
    lazy timer. A request inside the timeout moves the close to its own response's end."""
    import asyncio
    import time

    import uvicorn

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    keep = 0.4
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                            log_level="warning", timeout_keep_alive=keep,
                            http="dualproxy.servers.uvicorn_protocols:HTTPProtocol")
    server = uvicorn.Server(config)

    async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(2) == b"ok"
        return time.monotonic()

    async def run() -> None:
        serving = asyncio.ensure_future(server.serve())
        try:
            while not server.started:
                await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await get(reader, writer)
            await asyncio.sleep(keep * 0.6)
            answered = await get(reader, writer)  # inside the timeout: kept open
            await asyncio.sleep(keep * 0.6)
            answered = await get(reader, writer)
            assert await asyncio.wait_for(reader.read(1), keep * 5) == b""  # closed
            idle = time.monotonic() - answered
            assert keep * 0.9 <= idle < keep * 2.5, idle
            writer.close()
        finally:
            server.should_exit = True
            await serving

    asyncio.run(run())


def test_the_cheaper_send_takes_the_fields_uvicorns_rules_take() -> None:
    """Cycle's head agrees with uvicorn's HEADER_RE and HEADER_VALUE_RE, names that
    are no token (taken by uvicorn's rule) included, asked twice (the second time
    from the memo); a refused head leaves the cycle as it was, for uvicorn's send."""
    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

    from dualproxy.servers.uvicorn_protocols import Cycle

    def cycle() -> Cycle:
        return Cycle(scope={"method": "GET"}, transport=None, flow=None, logger=None,
                     access_logger=None, access_log=False, default_headers=[],
                     message_event=None, expect_100_continue=False, keep_alive=True,
                     on_response=lambda: None)

    names = [b"content-type", b"X-Ok", b"a/b", b"caf\xc3\xa9", b"", b"bad name", b"a:b",
             b"a\x00", b'q"', b"{x}"]
    values = [b"ok", b"tab\tok", b"nl\nbad", b"nul\x00bad", b"\x7f"]
    for _ in range(2):
        for name in names:
            for value in values:
                taken = not HEADER_RE.search(name) and not HEADER_VALUE_RE.search(value)
                one = cycle()
                head = one._head(200, [(b"Content-Length", b"0"), (name, value)])
                assert (head is not None) is taken, (name, value)
                assert one.response_started is taken
                assert one.chunked_encoding is (False if taken else None)
                if head is not None:
                    assert b"".join(head) == (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
                                              + name.lower() + b": " + value + b"\r\n\r\n")
    framed = cycle()  # the fields uvicorn reads, found under any case
    head = framed._head(200, [(b"Transfer-Encoding", b"Chunked"),
                              (b"Connection", b"keep-alive, Close")])
    assert head is not None and framed.chunked_encoding is True and not framed.keep_alive
    assert b"".join(head) == (b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n"
                              b"connection: keep-alive, Close\r\n\r\n")
    assert cycle()._head(200, [("str", b"x")]) is None  # type: ignore[list-item]
    for byte in range(256):  # every byte, alone in a value
        value = bytes([byte])
        head = cycle()._head(200, [(b"x", value)])
        assert (head is None) is bool(HEADER_VALUE_RE.search(value)), value
    assert cycle()._head(999, []) is None
