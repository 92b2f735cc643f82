"""One suite, every face x server pairing, real processes on loopback.

`pairing` is a session-scoped parameter over the six pairings (select some with
`--pairing asgi-uvicorn` or DUALPROXY_PAIRINGS=asgi-uvicorn,wsgi-gunicorn).
`proxy` is a `dualproxy serve` process of the current pairing in front of the
recording `upstream`; `make_proxy(*flags)` starts (and caches) one with other
flags. Servers of a finished pairing are stopped before the next one starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    import trustme

    from tests.upstream import Upstream

PAIRINGS = ("asgi-uvicorn", "wsgi-gunicorn", "wsgi-uvicorn", "asgi-gunicorn", "asgi-granian",
            "wsgi-granian")
ROOT = Path(__file__).resolve().parent.parent

# What granian 2.8 does otherwise than the other servers, before dualproxy sees a
# request (servers/granian.py: both faces run on its ASGI interface). Each is a visible
# xfail on the two granian pairings only, where a test meets it.
GRANIAN_LIMITS = {
    "both-framings": "granian (hyper) drops a Content-Length sent next to Transfer-Encoding: "
                     "chunked and reads the body as chunked: the core never sees the "
                     "conflicting framing, so it cannot refuse it (RFC 9112 6.1 lets a server "
                     "read it so; the other servers refuse)",
    "bare-lf": "granian (hyper) takes a bare LF for a line end in the request head: "
               "`X-A: a\nX-Injected: 1` reaches the core as two valid fields",
    "head-answers": "granian (hyper) answers a request head it refuses (malformed, more than "
                    "100 fields, past its read buffer of 408 KiB) itself, before the app: "
                    "`400 Bad Request` or `431 Request Header Fields Too Large` with "
                    "`connection: close`, `content-length: 0` and no body, not problem+json, "
                    "and 431 for a long request line where the others say 414; granian 2.8 "
                    "has no setting or hook for that answer (its HTTP/1 settings: header read "
                    "timeout, keep-alive, buffer size, pipeline flush)",
    "head-timeout": "granian (hyper) closes a connection whose head did not arrive within "
                    "--header-timeout without a word, also when the head had begun, not with "
                    "a 408 problem",
    "header-order": "granian (hyper's HeaderMap) groups repeated header fields by name, both "
                    "ways: each name's values keep their order, the order between names is lost",
    "ws-stop": "granian 2.8 cannot keep an open WebSocket once its stop begins (the end of "
               "its accept loop ends every WebSocket handler, and its runtime is dropped as "
               "soon as the HTTP connections are done): the proxy closes each 1001 both ways "
               "as the stop begins, not at --graceful-timeout",
    "ws-close-reason": "granian drops the reason of the client's close frame: the app's "
                       "websocket.disconnect has its code only",
    "ws-big-ping": "granian reports an oversized ping (past 125 bytes, RFC 6455 5.5) to the "
                   "app as a close without a code (1005, as for a client's empty close "
                   "frame: the two cannot be told apart) and then sends the client an empty "
                   "close frame, not 1002",
}


def xfail_on_granian(request: pytest.FixtureRequest, limit: str, *, when: bool = True) -> None:
    """Mark the running test an xfail (strict) for GRANIAN_LIMITS[limit] on a granian pairing."""
    callspec = getattr(request.node, "callspec", None)
    pairing = str(callspec.params.get("pairing", "")) if callspec else ""
    if when and pairing.endswith("-granian"):
        request.applymarker(pytest.mark.xfail(strict=True, reason=GRANIAN_LIMITS[limit]))


# Flags every test proxy gets unless a test overrides them: short enough that a
# hung upstream fails a test in seconds, long enough for a loaded CI machine.
DEFAULT_FLAGS = ("--timeout", "5", "--idle-timeout", "10", "--log-level", "info")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--pairing", action="append", default=[], choices=PAIRINGS,
                     help="run the behaviour tests for this pairing only (repeatable)")


def selected_pairings(config: pytest.Config) -> list[str]:
    chosen: list[str] = list(config.getoption("--pairing"))
    env = os.environ.get("DUALPROXY_PAIRINGS", "")
    chosen += [p.strip() for p in env.split(",") if p.strip()]
    unknown = set(chosen) - set(PAIRINGS)
    if unknown:
        raise pytest.UsageError(f"unknown pairing(s): {sorted(unknown)}")
    return [p for p in PAIRINGS if p in chosen] or list(PAIRINGS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """DUALPROXY_SUITE_PART=pairings keeps the tests that take a pairing (directly or
    through a fixture), =unit the others: nox runs the first per pairing, the second
    once. Unset, everything runs."""
    part = os.environ.get("DUALPROXY_SUITE_PART")
    if part not in ("pairings", "unit"):
        return
    keep = [item for item in items
            if ("pairing" in getattr(item, "fixturenames", ())) == (part == "pairings")]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pairing" in metafunc.fixturenames:
        metafunc.parametrize("pairing", selected_pairings(metafunc.config), scope="session")


# -- what the run starts dies with it ---------------------------------------------------
#
# Whatever ends the run (its end, Ctrl-C, nox's SIGINT then SIGTERM then SIGKILL), no
# process a test started outlives it: every subprocess.Popen of this process is
# tracked; SIGINT, SIGTERM and SIGHUP signal them all at once (their process group
# when they lead one) before pytest unwinds, and its end stops what is left. A SIGKILL
# cannot be caught: on Linux each child started from the main thread is told to die
# with this process (prctl PR_SET_PDEATHSIG, SIGTERM, which every server drains on).

_children: list[subprocess.Popen[bytes]] = []
_original_popen_init = subprocess.Popen.__init__
PR_SET_PDEATHSIG = 1


def _death_signal() -> Callable[[], None] | None:
    """A preexec_fn making the child get SIGTERM when this process dies (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up now, not in the child
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl took hold
            os.kill(os.getpid(), signal.SIGTERM)

    return die_with_parent


def _tracked_popen_init(self: subprocess.Popen[bytes], *args: Any, **kwargs: Any) -> None:
    # The death signal follows the thread that forked: only the main one lives as long
    # as the run. (preexec_fn makes subprocess fork rather than vfork: a little slower.)
    if kwargs.get("preexec_fn") is None and threading.current_thread() is threading.main_thread():
        kwargs["preexec_fn"] = _death_signal()
    _original_popen_init(self, *args, **kwargs)
    _children[:] = [child for child in _children if child.returncode is None]
    _children.append(self)


def _signal_children(signum: int) -> list[subprocess.Popen[bytes]]:
    """Send `signum` to every child still running (to its group when it leads one)."""
    running = []
    for child in list(_children):
        if child.poll() is not None:
            continue
        running.append(child)
        try:
            if os.getpgid(child.pid) == child.pid:
                os.killpg(child.pid, signum)
            else:
                os.kill(child.pid, signum)
        except OSError:
            pass
    return running


def stop_children(timeout: float = 10.0) -> None:
    """SIGTERM every child still running, SIGKILL what has not exited after `timeout`."""
    running = _signal_children(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in running:
        try:
            child.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            pass
    _signal_children(signal.SIGKILL)


def _interrupted(signum: int, frame: object) -> None:
    """Tell every child to stop now (pytest's teardown may not get the time), then let
    pytest unwind as after Ctrl-C."""
    _signal_children(signal.SIGTERM)
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    subprocess.Popen.__init__ = _tracked_popen_init  # type: ignore[method-assign]
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # Only where Python's own handling stands (not under `nohup`, nor a runner's own).
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(signum, _interrupted)


def pytest_unconfigure(config: pytest.Config) -> None:
    stop_children()
    subprocess.Popen.__init__ = _original_popen_init  # type: ignore[method-assign]


class ChildLog:
    """A child's output in a temporary file unlinked at once: read while the child
    writes, and gone with the run however it ends (no `dualproxy-*.log` piles up)."""

    def __init__(self, prefix: str) -> None:
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=".log")
        self.file = os.fdopen(fd, "wb")  # what the child writes to (stdout and stderr)
        self._reader = open(path, "rb")  # noqa: SIM115  (closed by close())
        os.unlink(path)

        self._kept: str | None = None

    def text(self) -> str:
        if self._kept is not None:
            return self._kept
        self._reader.seek(0)
        return self._reader.read().decode(errors="replace")

    def close(self) -> None:
        """Close both ends; what was written stays readable."""
        if self._kept is None:
            self._kept = self.text()
            self.file.close()
            self._reader.close()


# Parts of the suite run side by side (tests/parallel.py) and each asks for free ports:
# two asking the kernel for "any port" can be given the same one between the ask and the
# server's bind, and a proxy found "ready" was then another part's (a 404 from a proxy
# with another mount). So each part takes its ports from a block of its own, below the
# kernel's ephemeral range (32768+, where the kernel's own picks for bind(0) and for
# outgoing connections stay).
PORT_SLOT = os.environ.get("DUALPROXY_PORT_SLOT")
PORT_BLOCK = 1000
_next_port = [0]


def free_port() -> int:
    """A port nothing listens on (from this part's block when parts run side by side)."""
    if PORT_SLOT is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    first = 20000 + int(PORT_SLOT) * PORT_BLOCK
    for _ in range(PORT_BLOCK):
        port = first + _next_port[0] % PORT_BLOCK
        _next_port[0] += 1
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use, or in TIME_WAIT: the next one
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + PORT_BLOCK - 1}")


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM a child started with start_new_session and its group; SIGKILL after timeout."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class ProxyProcess:
    """A `dualproxy serve` child process, started the way a user starts it."""

    module = "dualproxy"  # run as `python -m <module> serve ...`

    def __init__(self, pairing: str, upstream: str, flags: tuple[str, ...]) -> None:
        self.pairing = pairing
        self.adapter, self.server = pairing.split("-")
        self.port = free_port()
        self.tls = "--certfile" in flags  # serving HTTPS (front TLS)
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        self.flags = flags
        self._log = ChildLog(f"dualproxy-{pairing}-")
        # No upstream: a `--config FILE` proxy, whose file holds the routes and their
        # options (route flags are refused next to it).
        route = ["--upstream", upstream, *DEFAULT_FLAGS] if upstream else ["--log-level", "info"]
        args = [sys.executable, "-m", self.module, "serve", *route,
                "--adapter", self.adapter, "--server", self.server,
                "--bind", f"127.0.0.1:{self.port}", *flags]
        self.proc = subprocess.Popen(args, stdout=self._log.file, stderr=subprocess.STDOUT,
                                     cwd=ROOT, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.pairing} proxy exited:\n{self.log()}")
            if self._answers():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.pairing} proxy did not start:\n{self.log()}")

    def _answers(self) -> bool:
        """Does an HTTP answer come back? An open port is not enough: gunicorn's arbiter
        listens before its worker has imported the app. The probe's target (encoded NUL)
        is refused by the core, so it never reaches an upstream."""
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=1)
            if self.tls:  # the probe only asks whether it answers: no verification
                unverified = ssl.create_default_context()
                unverified.check_hostname = False
                unverified.verify_mode = ssl.CERT_NONE
                try:
                    sock = unverified.wrap_socket(sock, server_hostname="127.0.0.1")
                except OSError:
                    sock.close()
                    raise
            with sock:
                sock.settimeout(5)
                sock.sendall(b"GET /%00dualproxy-ready HTTP/1.1\r\nHost: ready\r\n"
                             b"Connection: close\r\n\r\n")
                return sock.recv(16).startswith(b"HTTP/1.")
        except OSError:
            return False

    def log(self) -> str:
        return self._log.text()

    def client(self, **kwargs: object) -> httpx.Client:
        """An httpx client aimed at the proxy (tests that need the wire use rawhttp)."""
        return httpx.Client(base_url=self.url, timeout=30.0, **kwargs)  # type: ignore[arg-type]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_group(self.proc)
        self._log.close()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    from tests.upstream import Upstream

    server = Upstream().start()
    yield server
    server.stop()


class ProxyPool:
    """Caches proxy processes by (pairing, flags); one pairing's servers at a time."""

    def __init__(self) -> None:
        self.running: dict[tuple[str, str, tuple[str, ...]], ProxyProcess] = {}

    def get(self, pairing: str, upstream: str, flags: tuple[str, ...]) -> ProxyProcess:
        key = (pairing, upstream, flags)
        proc = self.running.get(key)
        if proc is not None and proc.alive():
            return proc
        for other_key in [k for k in self.running if k[0] != pairing]:
            self.running.pop(other_key).stop()
        proc = ProxyProcess(pairing, upstream, flags)
        self.running[key] = proc
        return proc

    def stop_all(self) -> None:
        # All told first, then each waited for: a pairing's run leaves over a hundred
        # proxies here, and stopping them one after another took 30 s of its teardown.
        for proc in self.running.values():
            if proc.alive():
                os.killpg(proc.proc.pid, signal.SIGTERM)
        for proc in self.running.values():
            proc.stop()
        self.running.clear()


@pytest.fixture(scope="session")
def proxy_pool() -> Iterator[ProxyPool]:
    pool = ProxyPool()
    yield pool
    pool.stop_all()


MakeProxy = Callable[..., ProxyProcess]


@pytest.fixture
def make_proxy(pairing: str, upstream: Upstream, proxy_pool: ProxyPool) -> MakeProxy:
    """`make_proxy("--mount", "/api", upstream_path="/base")`: a proxy with these flags."""

    def make(*flags: str, upstream_path: str = "", upstream_url: str | None = None
             ) -> ProxyProcess:
        url = upstream_url if upstream_url is not None else upstream.url + upstream_path
        return proxy_pool.get(pairing, url, tuple(flags))

    return make


@pytest.fixture
def proxy(make_proxy: MakeProxy) -> ProxyProcess:
    """The pairing's proxy with default flags, in front of the recording upstream."""
    return make_proxy()


@pytest.fixture
def rid() -> str:
    """A unique request id; send it as `x-req-id` to find the upstream's record."""
    return uuid.uuid4().hex


# ------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TLSFiles:
    """A private CA made by the tests, and PEM files it signed (paths as str)."""

    ca: trustme.CA
    ca_pem: str             # the CA certificate: --upstream-ca / verify=
    server_pem: str         # server certificate chain + key, for 127.0.0.1 and localhost
    server_key: str         # the same server's key alone (--keyfile)
    server_cert: str        # the same server's certificate chain alone (--certfile)
    client_cert: str        # a client certificate (mutual TLS) ...
    client_key: str         # ... and its key
    other_ca_pem: str       # another CA, which signed none of them

    def client_context(self) -> ssl.SSLContext:
        """Trusting the CA: for a client of the proxy serving HTTPS."""
        return ssl.create_default_context(cafile=self.ca_pem)

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_pem)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.ca_pem)
        return context


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@dualproxy.test")
    folder = tmp_path_factory.mktemp("tls")

    def write(name: str, *blobs: trustme.Blob) -> str:
        path = folder / name
        path.write_bytes(b"".join(blob.bytes() for blob in blobs))
        return str(path)

    return TLSFiles(
        ca=ca,
        ca_pem=write("ca.pem", ca.cert_pem),
        server_pem=write("server.pem", server.private_key_pem, *server.cert_chain_pems),
        server_key=write("server.key", server.private_key_pem),
        server_cert=write("server.crt", *server.cert_chain_pems),
        client_cert=write("client.crt", *client.cert_chain_pems),
        client_key=write("client.key", client.private_key_pem),
        other_ca_pem=write("other-ca.pem", trustme.CA().cert_pem),
    )


@pytest.fixture(scope="session")
def https_upstream(tls_files: TLSFiles) -> Iterator[Upstream]:
    """The recording upstream serving HTTPS with a certificate of the tests' private CA."""
    from tests.upstream import Upstream

    server = Upstream(ssl=tls_files.server_context()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mtls_upstream(tls_files: TLSFiles) -> Iterator[Upstream]:
    """The recording upstream over HTTPS, refusing clients without a certificate of the CA."""
    from tests.upstream import Upstream

    server = Upstream(ssl=tls_files.server_context(require_client_cert=True)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def socket_dir() -> Iterator[str]:
    """A folder for unix sockets, with a short path (sun_path holds 108 bytes)."""
    folder = tempfile.mkdtemp(prefix="dp-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def unix_upstream(socket_dir: str) -> Iterator[Upstream]:
    """The recording upstream on a unix socket."""
    from tests.upstream import Upstream

    with Upstream(unix=os.path.join(socket_dir, "up.sock")) as server:
        yield server


def transfer_hashed(proxy: ProxyProcess, upstream: Upstream, size: int,
                    **client_options: object) -> None:
    """An upload and a download of `size` bytes through `proxy`, hashed at both ends."""
    import hashlib

    from tests.upstream import pattern_bytes, pattern_sha256

    body = pattern_bytes(size)
    up_id, down_id = uuid.uuid4().hex, uuid.uuid4().hex
    with proxy.client(**client_options) as client:
        resp = client.post("/upload", content=body, headers={"x-req-id": up_id})
        assert resp.status_code == 200, resp.text
        assert resp.json()["body_sha256"] == pattern_sha256(size)
        rec = upstream.wait_record(up_id, complete=True)
        assert rec.complete and rec.body_length == size
        digest = hashlib.sha256()
        with client.stream("GET", "/download", headers={
                "x-req-id": down_id, "x-upstream": f"download size={size}"}) as down:
            assert down.status_code == 200
            for piece in down.iter_raw():
                digest.update(piece)
        assert digest.hexdigest() == pattern_sha256(size)


def assert_reused(proxy: ProxyProcess, upstream: Upstream, requests: int = 20) -> None:
    """Sequential requests through `proxy` ride one pooled upstream connection."""
    with proxy.client() as client:
        assert client.get("/warm").status_code == 200
        before = upstream.total_connections()
        for i in range(requests):
            assert client.get(f"/again/{i}").status_code == 200
    assert upstream.total_connections() - before <= 1


# ------------------------------------------------------------------------- Redis


class Redis:
    """A redis-server on a free loopback port, nothing saved (the rate limit's and the
    cache's shared stores)."""

    def __init__(self) -> None:
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        stop_group(self.proc)


@pytest.fixture
def redis_server() -> Iterator[Redis]:
    """Required, never skipped: .ci/run installs redis-server."""
    server = Redis()
    yield server
    server.stop()
