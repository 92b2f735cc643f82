"""The seeded draw of what each client does and what the upstream does to it.

A client thread draws its scenarios from its own `random.Random(f"{seed}-{thread}")`, so a
seed replays the same sequence of scenarios in every thread (timing differs; what each
client and the upstream were told to do does not).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tests.chaos.clients import Clients, KiB, MiB, Plan, upload

# Weights: client behaviours and upstream behaviours (HTTP and WebSocket).
CLIENT_MIX = {
    "ok": 30, "leave-upload": 8, "leave-after-head": 6, "leave-mid-body": 8, "slow-send": 5,
    "slow-read": 3, "stall-upload": 2, "pipeline": 5, "trickle-head": 4, "ws-quiet": 6,
    "slowloris": 1, "ws-burst": 1, "huge-head": 1,
}
UPSTREAM_MIX = {
    "ok": 30, "status": 4, "early": 5, "early-endless": 3, "endless": 3, "reset": 8,
    "close-rst": 5, "stall-head": 4, "trickle-head": 2, "stall-body": 3, "trailers": 3,
    "trailers-endless": 2,
}
WS_MIX = {"ws-ok": 50, "ws-bad-accept": 10, "ws-no-upgrade": 10, "ws-101-reset": 10,
          "ws-refuse": 10}
# Upstream behaviours whose answer, when the upstream wrote it all, a client that stays
# must receive whole (the others pause past the proxy's limits or end in an RST).
CLEAN = frozenset({"ok", "status", "trailers"})


@dataclass(frozen=True)
class Limits:
    """The proxy's limits the draw plays around."""

    timeout: float
    idle_timeout: float


def _pick(rng: random.Random, mix: dict[str, int], only: tuple[str, ...] | None) -> str:
    names = [n for n in mix if only is None or n in only] or list(mix)
    return rng.choices(names, [mix[n] for n in names])[0]


def _size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.6:
        return rng.randrange(0, 4 * KiB)
    if roll < 0.85:
        return rng.randrange(4 * KiB, 256 * KiB)
    return rng.randrange(MiB - 64 * KiB, MiB + 512 * KiB)  # across the 1 MiB high-water


def upstream_spec(rng: random.Random, limits: Limits, only: tuple[str, ...] | None) -> str:
    """An `x-chaos-up` value for an HTTP request."""
    name = _pick(rng, UPSTREAM_MIX, only)
    size = _size(rng)
    framing = rng.choice(["cl", "chunked", "close"])
    idle = f" idle={rng.uniform(0.05, 1.0):.2f}" if rng.random() < 0.4 else ""
    late = rng.random() < 0.5  # past the proxy's limit, or within it
    if name == "ok":
        return f"ok size={size} framing={framing}{idle}"
    if name == "status":
        return f"status code={rng.choice([201, 204, 302, 304, 404, 410])}{idle}"
    if name == "early":
        return f"early size={rng.randrange(0, 2 * KiB)} then={rng.choice(['close', 'drain'])}"
    if name == "reset":
        where = rng.choice(["head", "body", "body"])
        size = max(size, 1)
        at = rng.randrange(0, 200) if where == "head" else rng.randrange(0, size)
        return f"reset where={where} at={at} size={size} framing={framing}"
    if name == "close-rst":
        return f"close-rst size={max(size, 1)}"
    if name == "stall-head":
        seconds = limits.timeout + 1.5 if late else limits.timeout / 4
        return f"stall-head seconds={seconds:.2f} size={size} framing={framing}{idle}"
    if name == "trickle-head":
        interval = 0.3 if late else 0.002
        return f"trickle-head interval={interval} size={size}{idle}"
    if name == "stall-body":
        seconds = limits.idle_timeout + 1.5 if late else limits.idle_timeout / 4
        at = rng.randrange(0, max(size, 1))
        return f"stall-body at={at} seconds={seconds:.2f} size={size} " \
               f"framing={rng.choice(['cl', 'chunked'])}{idle}"
    if name == "trailers":
        return f"ok size={size} framing=chunked trailers={rng.randrange(1, 4)}{idle}"
    return name  # early-endless, endless, trailers-endless


def http_plan(rng: random.Random, client: str, limits: Limits,
              only_up: tuple[str, ...] | None) -> Plan:
    """One request of client behaviour `client`."""
    up = upstream_spec(rng, limits, only_up)
    method = rng.choice(["GET", "GET", "POST", "PUT"])
    with_body = method != "GET" or client in ("leave-upload", "slow-send", "stall-upload")
    body = upload(f"{rng.random()}", _size(rng)) if with_body else None
    if body is not None and client in ("leave-upload", "slow-send", "stall-upload"):
        method = "POST"
        body = body or upload(f"{rng.random()}", rng.randrange(KiB, 64 * KiB))
        if client == "slow-send":
            body = body[:200 * KiB]
    plan = Plan(method=method, target=f"/chaos/{client}?n={rng.randrange(1 << 30)}", up=up,
                body=body, chunked=rng.random() < 0.5, rst=rng.random() < 0.3)
    if client == "leave-upload" and body:
        # Chunked: up to all the data without the last chunk; Content-Length: short of it.
        plan.leave_upload_at = rng.randrange(0, len(body) + plan.chunked)
    elif client == "leave-after-head":
        if body and rng.random() < 0.5:
            plan.leave_upload_at = 0
        else:
            plan.leave_after_head = True
    elif client == "leave-mid-body":
        plan.leave_body_at = rng.randrange(1, 64 * KiB)
    elif client == "stall-upload" and body:
        plan.stall_upload_at = rng.randrange(0, len(body))
    elif client == "slow-send":
        plan.send_pause = rng.uniform(0.02, 0.1)
    elif client == "slow-read":
        plan.read_pause = rng.uniform(0.005, 0.03)
    elif client == "huge-head":  # past the proxy's 32 KiB / 100 fields: 431, never upstream
        plan.filler = rng.randrange(40 * KiB, 2 * MiB)
    elif client == "trickle-head":
        plan.head_trickle = rng.uniform(0.01, 0.08)
    return plan


@dataclass
class Draw:
    """A client thread's seeded scenario source."""

    rng: random.Random
    limits: Limits
    only_client: tuple[str, ...] | None = None
    only_upstream: tuple[str, ...] | None = None

    def next(self, clients: Clients) -> Callable[[], None]:
        """The next scenario, ready to run."""
        rng = self.rng
        kind = _pick(rng, CLIENT_MIX, self.only_client)
        if kind in ("ws-quiet", "ws-burst"):
            up = _pick(rng, WS_MIX, self.only_upstream if self.only_upstream and any(
                u in WS_MIX for u in self.only_upstream) else None)
            # A burst stays longer than the bounds on answers, so a worker it starves shows.
            quiet = rng.uniform(12.0, 20.0) if kind == "ws-burst" else rng.uniform(0.5, 6.0)
            how = rng.choice(["close", "fin", "rst"])
            count = 40 if kind == "ws-burst" else 1
            return lambda: clients.websocket(kind, up, quiet, how, count)
        if kind == "slowloris":
            seconds = rng.uniform(12.0, 20.0)
            return lambda: clients.slowloris(kind, 40, seconds)
        if kind == "pipeline":
            plans = [http_plan(rng, "ok", self.limits, self.only_upstream)
                     for _ in range(rng.randrange(2, 4))]
            for plan in plans:  # pipelined requests carry small Content-Length bodies
                plan.chunked = False
                plan.body = plan.body[:8 * KiB] if plan.body is not None else None
            return lambda: clients.run_plans(kind, plans, pipeline=True)
        plans = [http_plan(rng, kind, self.limits, self.only_upstream)]
        if kind == "ok":
            plans += [http_plan(rng, kind, self.limits, self.only_upstream)
                      for _ in range(rng.randrange(0, 3))]
        return lambda: clients.run_plans(kind, plans)
