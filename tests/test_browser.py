"""The demo page in a real browser, through every pairing.

Headless Chromium from the system packages (`apt-get install chromium`; `.ci/run` does it)
is driven over the DevTools protocol with the `websockets` library the proxy already
depends on: no selenium, no chromedriver, nothing downloaded at test time. The page is
served by the demo upstream (`dualproxy.demo:upstream_app` on uvicorn) through a
`dualproxy serve` of the pairing; the test uploads a file, downloads one, watches the SSE
clock tick and chats over the WebSocket, and checks what the page shows.

DUALPROXY_DEMO_SCREENSHOT=docs/demo.png saves a screenshot of the page (asgi-uvicorn).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.conftest import ROOT, MakeProxy, free_port, stop_group

MB = 1024 * 1024
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-proxy-server", "--window-size=1280,880", "--remote-debugging-port=0",
)


def find_chromium() -> str | None:
    """DUALPROXY_CHROMIUM if set, else Debian's chromium, else a Chrome on PATH."""
    chosen = os.environ.get("DUALPROXY_CHROMIUM")
    names = [chosen] if chosen else ["/usr/bin/chromium", "chromium", "chromium-browser",
                                     "google-chrome"]
    return next((found for name in names if (found := shutil.which(name))), None)


class Page:
    """One browser tab over the DevTools protocol: call methods, evaluate JavaScript."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.last_id = 0
        self.events: list[dict[str, Any]] = []  # of the domains enabled (Network.enable...)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        self.conn.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        deadline = time.monotonic() + 30
        while True:  # events (no "id") are kept for wait_event
            reply = json.loads(self.conn.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if reply.get("id") == self.last_id:
                break
            if "method" in reply:
                self.events.append(reply)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply["result"]
        return result

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_event(self, method: str, match: Any, timeout: float = 30) -> dict[str, Any]:
        """The params of the first event `method` for which `match(params)` is true."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event["method"] == method and match(event["params"]):
                    params: dict[str, Any] = event["params"]
                    return params
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {method} event matched in {timeout} s")
            with contextlib.suppress(TimeoutError):
                reply = json.loads(self.conn.recv(timeout=left))
                if "method" in reply:
                    self.events.append(reply)

    def text(self, element_id: str) -> str:
        return str(self.js(f"document.getElementById({element_id!r})?.textContent ?? ''"))

    def click(self, element_id: str) -> None:
        self.js(f"document.getElementById({element_id!r}).click()")

    def wait_text(self, element_id: str, pattern: str, timeout: float = 60) -> re.Match[str]:
        """Poll until the element's text matches; fail with what the page shows."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.text(element_id))
            if match:
                return match
            if time.monotonic() > deadline:
                state = self.js("document.body?.innerText")
                pytest.fail(f"#{element_id} never matched {pattern!r}; the page shows:\n{state}")
            time.sleep(0.1)

    def set_file(self, selector: str, path: Path) -> None:
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])

    def screenshot(self, path: Path) -> None:
        height = self.js("document.querySelector('main').getBoundingClientRect().bottom")
        clip = {"x": 0, "y": 0, "width": 1280, "height": round(height), "scale": 1}
        data = self.call("Page.captureScreenshot", format="png", clip=clip)["data"]
        path.write_bytes(base64.b64decode(data))


class Browser:
    """A headless Chromium with a fresh profile; `page(url)` opens a tab."""

    def __init__(self, executable: str) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="dualproxy-chromium-"))
        self.log = (self.profile.parent / f"{self.profile.name}.log").open("wb")
        self.proc = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = Path(self.log.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"chromium did not open its DevTools port:\n{log}")
            time.sleep(0.1)
        self.devtools = f"http://127.0.0.1:{port_file.read_text().split()[0]}"

    @contextlib.contextmanager
    def page(self, url: str) -> Iterator[Page]:
        target = httpx.put(f"{self.devtools}/json/new?{url}", timeout=30).json()
        try:
            with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as conn:
                yield Page(conn)
        finally:
            httpx.get(f"{self.devtools}/json/close/{target['id']}", timeout=10)

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = find_chromium()
    if executable is None:
        if os.environ.get("DUALPROXY_REQUIRE_BROWSER"):
            pytest.fail("DUALPROXY_REQUIRE_BROWSER is set and no Chromium was found")
        pytest.skip("no Chromium found (apt-get install chromium, or set DUALPROXY_CHROMIUM): "
                    "the demo page was not tested in a browser")
    chromium = Browser(executable)
    yield chromium
    chromium.stop()


@pytest.fixture(scope="module")
def demo_upstream() -> Iterator[str]:
    """The demo's upstream app on uvicorn, as `dualproxy demo` starts it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "dualproxy.demo:upstream_app", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the demo upstream did not start")
        time.sleep(0.1)
    yield url
    stop_group(proc)


def pattern_sha256(size: int) -> str:
    """The demo download's bytes: 0..255 repeated."""
    block, digest = bytes(range(256)) * 256, hashlib.sha256()
    for _ in range(size // len(block)):
        digest.update(block)
    digest.update(block[: size % len(block)])
    return digest.hexdigest()


def _compressed_as_chromium_saw_it(page: Page, proxy_url: str) -> None:
    """Reload with the Network domain on: the page and the SSE clock came zstd-encoded
    (Chromium offers `gzip, deflate, br, zstd`; ties go to zstd), decoded by Chromium."""
    page.call("Network.enable")
    page.call("Page.reload", ignoreCache=True)
    sent = page.wait_event("Network.requestWillBeSentExtraInfo",
                           lambda p: "accept-encoding" in {k.lower() for k in p["headers"]})
    offered = next(v for k, v in sent["headers"].items() if k.lower() == "accept-encoding")
    assert {"br", "zstd"} <= {c.strip() for c in offered.split(",")}, offered
    for url, kind in ((proxy_url + "/", "text/html"), (proxy_url + "/events",
                                                       "text/event-stream")):
        response = page.wait_event("Network.responseReceived",
                                   lambda p, url=url: p["response"]["url"] == url)["response"]
        headers = {k.lower(): v for k, v in response["headers"].items()}
        assert headers["content-encoding"] in ("br", "zstd"), (url, headers)
        assert headers["content-type"].startswith(kind)
        assert "accept-encoding" in headers["vary"].lower()
    page.call("Network.disable")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compress"])
def test_demo_page_in_a_browser(browser: Browser, demo_upstream: str, make_proxy: MakeProxy,
                                pairing: str, tmp_path: Path, compress: bool) -> None:
    proxy = make_proxy(*(["--compress"] if compress else []), upstream_url=demo_upstream)
    with browser.page(proxy.url + "/") as page:
        page.call("Runtime.enable")
        page.wait_text("ws-state", r"^open$|closed")
        if compress:
            _compressed_as_chromium_saw_it(page, proxy.url)
            page.wait_text("ws-state", r"^open$|closed")
        # The page came through the proxy: the upstream saw its forwarding headers.
        assert re.search(r"x-forwarded-for: 127\.0\.0\.1", page.text("headers")), \
            page.text("headers")

        # Upload a generated file; the upstream's hash and the browser's match the file's.
        upload = tmp_path / "upload.bin"
        upload.write_bytes(os.urandom(8 * MB))
        expected = hashlib.sha256(upload.read_bytes()).hexdigest()
        page.set_file("#file", upload)
        page.wait_text("up-status", r"upload\.bin, 8\.0 MiB")
        page.click("upload")
        page.wait_text("up-verdict", r"\S")
        assert page.text("up-remote") == expected
        assert page.text("up-local") == expected
        assert "the same bytes" in page.text("up-verdict")
        assert "received 8.0 MiB" in page.text("up-status")

        # Download 8 MiB; the hash computed in the browser is the pattern's.
        page.js("document.getElementById('down-size').value = '8'")
        page.click("download")
        page.wait_text("down-verdict", r"\S")
        assert page.text("down-local") == pattern_sha256(8 * MB)
        assert page.text("down-expected") == pattern_sha256(8 * MB)
        assert page.text("down-status").startswith("done: 8.0 MiB")

        # The SSE clock: two more ticks arrive while the page watches (live, not buffered).
        first = int(page.wait_text("clock-status", r"^(\d+) ticks received").group(1))
        page.wait_text("clock-status", rf"^({first + 2}|{first + 3}|{first + 4}) ticks received",
                       timeout=20)
        assert re.fullmatch(r"\d\d:\d\d:\d\d", page.text("clock"))

        # The WebSocket chat: a message comes back.
        assert page.text("ws-state") == "open", page.text("ws-log")
        word = f"hello-{uuid.uuid4().hex[:8]}"
        page.js(f"document.getElementById('ws-input').value = {word!r}")
        page.click("ws-send")
        page.wait_text("ws-log", rf"{word}.*{word}", timeout=20)  # sent, then echoed
        echoed = page.js("[...document.querySelectorAll('#ws-log li.in')]"
                         ".map((li) => li.textContent)")
        assert word in echoed

        # Stop the clock: the page says so and no tick arrives any more.
        page.click("clock-toggle")
        stopped = page.wait_text("clock-status", r"^stopped after (\d+) ticks").group(0)
        time.sleep(1.5)
        assert page.text("clock-status") == stopped

        shot = os.environ.get("DUALPROXY_DEMO_SCREENSHOT")
        if shot and pairing == "asgi-uvicorn" and not compress:
            page.js("document.getElementById('clock-toggle').click()")  # running again
            page.wait_text("clock-status", r"ticks received \(event [1-9]")
            page.screenshot(ROOT / shot)
