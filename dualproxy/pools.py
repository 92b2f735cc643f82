"""One pool per upstream set and process: what routes naming the same upstreams share.

A route's proxy (face.py) sends through a `Pool`: its upstream client and
transport (the connections), its `Balancer` (in-flight counts, health marks)
and its active health prober. A `Pools` registry hands them out, one per
`PoolKey`: the upstreams (as a set; base paths included, since a probe asks
for base + health path) and every setting that shapes a connection or a
choice (TLS verify and cert, connection limits, balance policy, max_fails and
fail_timeout, health path, interval and probe timeout). Routes whose keys are
equal share one pool, so an upstream one route finds down is down for every
route to it, and a connection one route opened carries the next route's
request; routes whose keys differ in anything share nothing. What stays per
route is what the route's own requests carry (timeouts, retries, headers,
limits on the client side).

The decision is made once, here; who asks is the router (router.py: its routes
share one registry; the WSGI face's WebSocket twin joins the same registry, so
its async pool shares the balancer). A standalone proxy keeps a registry of its
own, as does a proxy given its own `client=` (that client is never shared).

Life cycle: a pool's client (one per kind of face: the sync and the async face
make different clients, keyed by the face's client maker) is made by the
first route that needs it, which also starts the prober (one per balancer);
every route holding it says so (`acquire`), and the client is closed and the
prober stopped once, when the last holder lets go (`release`). The next
request after that makes another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .balancer import Balancer
from .config import ProxyConfig
from .health import probe_seconds
from .upstreams import Upstream

ClientT = TypeVar("ClientT")
TransportT = TypeVar("TransportT")


@dataclass(frozen=True)
class PoolKey:
    """What two routes must agree on to share one pool."""

    upstreams: frozenset[Upstream]
    verify: Hashable
    cert: Hashable
    max_connections: int
    max_keepalive_connections: int
    balance: str
    max_fails: int
    fail_timeout: float
    # (path, interval, probe timeout) of the active checks, None without them
    health: tuple[str, float, float] | None

    @classmethod
    def of(cls, config: ProxyConfig) -> PoolKey:
        cert = config.cert
        return cls(
            upstreams=frozenset(config.upstreams),
            verify=config.verify,  # an ssl.SSLContext is one by identity
            cert=tuple(cert) if isinstance(cert, list) else cert,
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_keepalive_connections,
            balance=config.balance,
            max_fails=config.max_fails,
            fail_timeout=config.fail_timeout,
            health=None if config.health_path is None else (
                config.health_path, config.health_interval, probe_seconds(config)),
        )


def new_balancer(config: ProxyConfig) -> Balancer:
    return Balancer(config.upstreams, policy=config.balance,
                    max_fails=config.max_fails, fail_timeout=config.fail_timeout)


class Pool(Generic[ClientT, TransportT]):
    """One upstream set's client, transport, balancer and prober, for one kind of face."""

    def __init__(self, config: ProxyConfig, balancer: Balancer,
                 client: ClientT | None = None) -> None:
        self.config = config  # the first route's: equal to every sharer's in its key
        self.balancer = balancer
        self.client: ClientT | None = client
        self.transport: TransportT | None = None
        self.owns_client = client is None
        self.health: Any = None  # the prober this pool started (one per balancer)
        self._holders: set[int] = set()  # id() of the routes holding the client
        self._lock = threading.Lock()

    def holders(self) -> int:
        return len(self._holders)

    def acquire(self, holder: object, new_client: Callable[[], tuple[ClientT, TransportT]],
                start_health: Callable[[ClientT, TransportT | None], Any]
                ) -> tuple[ClientT, TransportT | None]:
        """The client and transport for `holder` (a route's proxy), made by the first
        holder, which starts the prober with them."""
        with self._lock:
            if self.client is None:
                self.client, self.transport = new_client()
            if not self._holders and self.config.health_path is not None \
                    and self.balancer.prober is None:
                self.health = self.balancer.prober = start_health(self.client, self.transport)
            self._holders.add(id(holder))
            return self.client, self.transport

    def release(self, holder: object) -> ClientT | None:
        """`holder` is done with the client: when it was the last, the prober stops and
        the client to close is returned (None when others hold it, or it is a user's)."""
        with self._lock:
            self._holders.discard(id(holder))
            if self._holders:
                return None
            health, self.health = self.health, None
            if health is not None:
                health.stop()
                self.balancer.prober = None
            client = self.client if self.owns_client else None
            if client is not None:
                self.client = self.transport = None
            return client


class Pools:
    """The pools of one process's routes (a router's), one per key and kind of face."""

    def __init__(self) -> None:
        self._balancers: dict[PoolKey, Balancer] = {}
        self._pools: dict[tuple[Hashable, PoolKey], Pool[Any, Any]] = {}
        self._lock = threading.Lock()

    def balancer(self, config: ProxyConfig) -> Balancer:
        """The balancer of `config`'s upstream set (shared by both kinds of face)."""
        key = PoolKey.of(config)
        with self._lock:
            return self._balancer(key, config)

    def _balancer(self, key: PoolKey, config: ProxyConfig) -> Balancer:
        balancer = self._balancers.get(key)
        if balancer is None:
            balancer = self._balancers[key] = new_balancer(config)
        return balancer

    def pool(self, config: ProxyConfig, kind: Hashable) -> Pool[Any, Any]:
        """The pool for `config` on a face of `kind` (the face's client maker)."""
        key = PoolKey.of(config)
        with self._lock:
            pool = self._pools.get((kind, key))
            if pool is None:
                pool = self._pools[kind, key] = Pool(config, self._balancer(key, config))
            return pool

    def in_use(self, name: str) -> int:
        """Requests in flight to the upstream named `name` (its metrics label), over every
        pool of the registry: each balancer counted once, however many routes share it."""
        with self._lock:
            balancers = list(self._balancers.values())
        return sum(balancer.inflight(upstream) for balancer in balancers
                   for upstream in balancer.upstreams if str(upstream) == name)

    def __len__(self) -> int:
        return len(self._pools)
