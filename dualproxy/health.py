"""Active health checks: a GET of each upstream's base + `health_path`, every interval.

Only the I/O lives here; what a probe's answer means is the balancer's
(`Balancer.probed`: 2xx/3xx is up). One prober per face and worker process,
started with the face's client and stopped with it: a thread for the WSGI
face, an asyncio task for the ASGI face. Probes go through the proxy's own
transport (so a unix or https upstream is probed as it is proxied to).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import httpx

from .balancer import Balancer
from .config import ProxyConfig
from .upstreams import UPSTREAM, Upstream

error_logger = logging.getLogger("dualproxy")


def probe_seconds(config: ProxyConfig) -> float:
    """A probe's timeout: the interval (at least a second), at most the route's timeout."""
    return min(config.timeout, max(config.health_interval, 1.0))


def probe_request(config: ProxyConfig, upstream: Upstream) -> httpx.Request:
    """The health check request for `upstream`, with a short timeout of its own."""
    assert config.health_path is not None
    seconds = probe_seconds(config)
    return httpx.Request(
        "GET", httpx.URL(upstream.origin),
        headers=[(b"host", upstream.authority), (b"user-agent", b"dualproxy-health")],
        extensions={"target": upstream.base + config.health_path.encode("ascii"),
                    "timeout": {"connect": seconds, "read": seconds, "write": seconds,
                                "pool": seconds},
                    UPSTREAM: upstream})


def _report(balancer: Balancer, upstream: Upstream, status: int | None,
            exc: BaseException | None = None) -> None:
    """Tell the balancer; log when the upstream goes down or comes back."""
    was_up = balancer.available(upstream)
    up = balancer.probed(upstream, status)
    if up and not was_up:
        error_logger.info("upstream %s is up again (health check: %s)", upstream, status)
    elif was_up and not up:
        cause = type(exc).__name__ if exc is not None else f"status {status}"
        error_logger.warning("upstream %s is down (health check: %s)", upstream, cause)


class HealthThread:
    """The WSGI face's prober: a daemon thread probing every upstream in turn."""

    def __init__(self, config: ProxyConfig, balancer: Balancer, send: Any) -> None:
        self._config = config
        self._balancer = balancer
        self._send = send  # request -> httpx.Response (the face's transport)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dualproxy-health",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            for upstream in self._config.upstreams:
                if self._stop.is_set():
                    return
                try:
                    response = self._send(probe_request(self._config, upstream))
                    response.close()
                except Exception as exc:  # any failure is a failed probe
                    if self._stop.is_set():  # the face closed its client under the probe
                        return
                    _report(self._balancer, upstream, None, exc)
                else:
                    _report(self._balancer, upstream, response.status_code)
            if self._stop.wait(self._config.health_interval):
                return

    def stop(self) -> None:
        self._stop.set()


class HealthTask:
    """The ASGI face's prober: a task on the running loop."""

    def __init__(self, config: ProxyConfig, balancer: Balancer, send: Any) -> None:
        self._config = config
        self._balancer = balancer
        self._send = send  # request -> awaitable httpx.Response
        # Stopped by this flag, not by the cancellation alone: before Python 3.12,
        # `wait_for` may swallow a cancellation (a connect failing in the same
        # step), and the loop would probe on, holding the server's exit forever.
        self._stopped = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            for upstream in self._config.upstreams:
                if self._stopped:
                    return
                try:
                    response = await self._send(probe_request(self._config, upstream))
                    await response.aclose()
                except Exception as exc:  # any failure is a failed probe
                    _report(self._balancer, upstream, None, exc)
                else:
                    _report(self._balancer, upstream, response.status_code)
            await asyncio.sleep(self._config.health_interval)

    def stop(self) -> None:
        self._stopped = True
        self._task.cancel()
