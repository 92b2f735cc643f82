"""`dualproxy` on the command line: flags are checked before anything starts.

Each bad flag is run through the real CLI (a subprocess, as a user types it): exit
status 2, one line on stderr naming the flag, no traceback, nothing listening.
Sizes take K/M/G suffixes (powers of 1024, as nginx's): checked on every pairing.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import pytest

from dualproxy import __version__
from dualproxy.cli import DEFAULT_SERVER
from tests.conftest import ROOT, MakeProxy

UPSTREAM = "http://127.0.0.1:9"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dualproxy", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("flags", "names"), [
    (["--workers", "0"], "--workers"),
    (["--workers", "-3"], "--workers"),
    (["--workers", "two"], "--workers"),
    (["--adapter", "wsgi", "--workers", "0"], "--workers"),
    (["--threads", "0"], "--threads"),
    (["--max-connections", "0"], "--max-connections"),
    (["--max-body-size", "-1"], "--max-body-size"),
    (["--max-body-size", "1.5G"], "--max-body-size"),
    (["--max-body-size", "1KB"], "--max-body-size"),
    (["--ws-max-size", "0"], "--ws-max-size"),
    (["--ws-max-size", "-1"], "--ws-max-size"),
    (["--ws-max-size", "1.5M"], "--ws-max-size"),
    (["--ws-idle-timeout", "0"], "--ws-idle-timeout"),
    (["--ws-idle-timeout", "nan"], "--ws-idle-timeout"),
    (["--bind", ":99999"], "--bind"),
    (["--bind", "127.0.0.1:0"], "--bind"),
    (["--bind", "127.0.0.1"], "--bind"),
    (["--mount", "api"], "--mount"),
    (["--timeout", "0"], "--timeout"),
    (["--idle-timeout", "-1"], "--idle-timeout"),
    (["--pool-timeout", "nan"], "--pool-timeout"),
    (["--timeout", "inf"], "--timeout"),
    (["--graceful-timeout", "0"], "--graceful-timeout"),
    (["--graceful-timeout", "-1"], "--graceful-timeout"),
    (["--graceful-timeout", "soon"], "--graceful-timeout"),
    (["--trusted-proxy", "not-a-cidr"], "not-a-cidr"),
    (["--upstream", "ftp://x"], "ftp://x"),
    # a pool of upstreams
    (["--balance", "fastest"], "--balance"),
    (["--max-fails", "-1"], "--max-fails"),
    (["--max-fails", "one"], "--max-fails"),
    (["--retries", "-1"], "--retries"),
    (["--fail-timeout", "0"], "--fail-timeout"),
    (["--health-interval", "nan"], "--health-interval"),
    (["--health-path", "healthz"], "--health-path"),
    (["--upstream", UPSTREAM], "given twice"),
    (["--upstream", "http://127.0.0.1:9/other"], "share one base path"),
    # accepted once, then every request failed (or the server did not start)
    (["--mount", "/日本"], "percent-encode it ('/%E6%97%A5%E6%9C%AC')"),
    (["--mount", "/a/../admin"], "mount '/a/../admin' could never be routed"),
    (["--mount", "/a//b"], "mount '/a//b' could never be routed"),
    (["--mount", "/admin;v=1"], "mount '/admin;v=1' could never be routed"),
    (["--mount", "/a b"], "--mount"),
    (["--health-path", "/\x1b"], "--health-path"),
    (["--timeout", "1e300"], "--timeout"),
    (["--idle-timeout", "1000001"], "at most 1000000"),
    (["--ws-idle-timeout", "1e9"], "--ws-idle-timeout"),
    (["--graceful-timeout", "1e300"], "--graceful-timeout"),
    (["--workers", "100000"], "at most 256"),
    (["--threads", "100000"], "at most 4096"),
])
def test_bad_flags_are_one_line_usage_errors(flags: list[str], names: str) -> None:
    args = ["serve", "--upstream", UPSTREAM, "--bind", "127.0.0.1:1", *flags]
    result = run_cli(*args)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dualproxy serve: error: ") and names in lines[0], lines


@pytest.mark.parametrize(("args", "said"), [
    (["serve", "--upstream", UPSTREAM, "--upstrem", "http://x"],
     "dualproxy serve: error: unrecognized arguments: --upstrem http://x; "
     "did you mean --upstream?"),
    (["demo", "--adaptr", "asgi"],
     "dualproxy demo: error: unrecognized arguments: --adaptr asgi; did you mean --adapter?"),
    (["serve", "--upstream", UPSTREAM, "--zzzz"],
     "dualproxy serve: error: unrecognized arguments: --zzzz (see"),
])
def test_a_mistyped_flag_is_named_by_its_command(args: list[str], said: str) -> None:
    """An unknown flag is the subcommand's usage error (argparse's top parser said
    `dualproxy: error:`), with the flag it most likely meant."""
    result = run_cli(*args)
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(said), result.stderr


def test_version() -> None:
    result = run_cli("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"dualproxy {__version__}")


@pytest.mark.parametrize(("flag", "limit"), [("1K", 1024), ("2k", 2048), ("1KiB", 1024)])
def test_size_suffixes_are_powers_of_1024(make_proxy: MakeProxy, flag: str, limit: int) -> None:
    proxy = make_proxy("--max-body-size", flag)
    with proxy.client() as client:
        assert client.post("/size", content=b"x" * limit).status_code == 200
        over = client.post("/size", content=b"x" * (limit + 1),
                           headers={"connection": "close"})
    assert over.status_code == 413
    assert over.headers["content-type"] == "application/problem+json"


def test_a_large_suffixed_limit_lets_bodies_through(make_proxy: MakeProxy) -> None:
    proxy = make_proxy("--max-body-size", "1G")
    response = httpx.post(proxy.url + "/big", content=b"y" * 70000, timeout=30)
    assert response.status_code == 200
    assert response.json()["body_length"] == 70000


def test_several_workers_serve(make_proxy: MakeProxy) -> None:
    """`--workers 2`: uvicorn's workers build the app from the import string, gunicorn's
    from the options they inherit; either way every request is answered."""
    proxy = make_proxy("--workers", "2")
    with proxy.client() as client:
        statuses = [client.get(f"/w{i}", headers={"connection": "close"}).status_code
                    for i in range(20)]
    assert statuses == [200] * 20


def test_a_taken_port_is_one_line(pairing: str) -> None:
    """`serve` on a port in use: one line, exit 1, whatever the server; `demo` says the
    same before its banner (its adapter's natural server: both servers between them)."""
    adapter, server = pairing.split("-")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        served = run_cli("serve", "--upstream", UPSTREAM, "--bind", f"127.0.0.1:{port}",
                         "--adapter", adapter, "--server", server)
        runs = [("serve", served)]
        if DEFAULT_SERVER[adapter] == server:
            runs.append(("demo", run_cli("demo", "--bind", f"127.0.0.1:{port}",
                                         "--adapter", adapter)))
    for command, result in runs:
        assert (result.returncode, result.stdout) == (1, ""), result
        assert result.stderr.splitlines() == [
            f"dualproxy {command}: error: cannot listen on 127.0.0.1:{port}: "
            "Address already in use"], result.stderr
