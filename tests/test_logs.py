"""`--access-log-format json`: one JSON object a line, with the right values (every pairing)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from tests.conftest import MakeProxy, free_port
from tests.test_integrations import wait_until


def _lines(log: str, rid: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.splitlines()
            if line.startswith("{") and rid in line]


def test_json_lines_carry_the_values(make_proxy: MakeProxy, rid: str) -> None:
    proxy = make_proxy("--access-log-format", "json", "--mount", "/api")
    up = httpx.post(proxy.url + f"/api/up/{rid}", content=b"x" * 1234,
                    headers={"x-upstream": "download size=4321"})
    assert up.status_code == 200
    assert httpx.get(proxy.url + f"/elsewhere/{rid}").status_code == 404
    assert wait_until(lambda: len(_lines(proxy.log(), rid)) == 2), proxy.log()
    ok, outside = _lines(proxy.log(), rid)
    assert ok["method"] == "POST" and ok["target"] == f"/api/up/{rid}"
    assert (ok["status"], ok["bytes_in"], ok["bytes_out"], ok["outcome"]) == (
        200, 1234, 4321, "ok")
    assert isinstance(ok["upstream_ms"], float) and isinstance(ok["total_ms"], float)
    assert ok["route"] == "/api" and str(ok["upstream"]).startswith("http://127.0.0.1:")
    assert str(ok["time"]).endswith("Z")
    assert (outside["status"], outside["route"], outside["upstream"]) == (404, None, None)

    dead = make_proxy("--access-log-format", "json",
                      upstream_url=f"http://127.0.0.1:{free_port()}")
    assert httpx.get(dead.url + f"/gone/{rid}").status_code == 502
    assert wait_until(lambda: len(_lines(dead.log(), rid)) == 1), dead.log()
    [line] = _lines(dead.log(), rid)
    assert (line["status"], line["upstream_ms"], line["route"]) == (502, None, "/")


def test_bad_format_exits_2() -> None:
    done = subprocess.run([sys.executable, "-m", "dualproxy", "serve", "--upstream",
                           "http://127.0.0.1:9", "--access-log-format", "xml"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--access-log-format" in done.stderr
