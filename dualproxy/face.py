"""The face skeleton: what the ASGI and the WSGI face do alike, written once.

httpx's `BaseClient` idea: `ProxyFace` holds the configuration, the client's
life cycle and every step of a request that does no I/O; `AsyncProxy` and
`SyncProxy` add only translation (scope or environ in, messages or an iterable
out) and the waiting. The order of the steps is the exchange's (exchange.py,
one flow both faces drive):

1. the face describes what its server received (an `IncomingRequest`);
2. `begin` opens the access-log record, `plan` asks the core for the upstream
   plan, `exchange` gives the filters their view of it (filters/);
3. `choose` takes an upstream from the pool (balancer.py) and
   `upstream_request` builds the httpx request for it; a failure before the
   head goes to `retry`, which counts it against that upstream and names
   another one when the core says resending is safe;
4. `response_head` records the upstream status, switches to the idle timeout
   and asks the core for the head (`answer_head`: a filter's own answer's);
5. `refuse` and `finish` write the log lines; `finish` also runs the filters'
   `on_end` and ends the request's in-flight count.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx

from .config import ProxyConfig
from .core import (
    CHECKED_MOUNT,
    PROXY_METHODS,
    CheckedRequest,
    IncomingRequest,
    ResponseHead,
    UpstreamPlan,
    attempt_headers,
    build_plan,
    build_request,
    check_request,
    check_user_client,
    client_options,
    disable_cookies,
    enter_body_phase,
    may_retry,
    plan_response,
    request_stream,
    response_header_list,
    timeouts,
    upstream_failed,
)
from .errors import BadGateway, GatewayTimeout, ProxyError, describe
from .filters import Answer, Exchange, build_chain
from .filters.chain import run_sync
from .framing import FRAMING, Framing
from .headers import client_address
from .http1.connect import upstream_key
from .http1.pool import Call, Reply
from .logs import AccessLog, RequestRecord
from .pools import Pool, Pools
from .upstreams import Upstream

error_logger = logging.getLogger("dualproxy")

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .metrics import ProxyMetrics

ClientT = TypeVar("ClientT", httpx.Client, httpx.AsyncClient)
TransportT = TypeVar("TransportT", httpx.BaseTransport, httpx.AsyncBaseTransport)
AppT = TypeVar("AppT")


# The request line's method for the usual ones (their upper-cased bytes).
_METHOD_BYTES = {method: method.encode() for method in PROXY_METHODS}


class NoUpstream(BadGateway):
    """No upstream to try: the pool is empty of ones this request has not tried."""

    def __init__(self) -> None:
        super().__init__("no upstream is available")


class ProxyFace(Generic[ClientT, TransportT, AppT]):
    """Configuration, client and the I/O-free steps of a request, for both faces."""

    def __init__(
        self,
        upstream: str | Sequence[str] | None = None,
        *,
        config: ProxyConfig | None = None,
        client: ClientT | None = None,
        fallback: AppT | None = None,
        access_log: bool = True,
        access_log_format: str = "text",
        metrics: bool | CollectorRegistry = False,
        **options: Any,
    ) -> None:
        name = type(self).__name__
        if config is None:
            if upstream is None:
                raise TypeError(f"{name} needs an upstream URL (or a list) or a config")
            config = ProxyConfig.build(upstream, **options)
        elif upstream is not None or options:
            raise TypeError(f"{name}: pass either config= or upstream/options, not both")
        self.config = config
        self.fallback = fallback
        # The client and transport this proxy holds from its pool (None: not now).
        self._client: ClientT | None = None
        self._transport: TransportT | None = None
        self._lock = threading.Lock()
        # Every mount of the router this proxy is a route of (set by router.py).
        self.routes: tuple[bytes, ...] = ()
        if client is not None:
            check_user_client(client, config)
            disable_cookies(client)
        else:
            from .http1.tls import upstream_context

            # Load the CA bundle and client certificate now: a bad file is a
            # ValueError naming it here, not an error at the first request.
            upstream_context(config)
        self._log = AccessLog(enabled=access_log, format=access_log_format,
                              # a pool's record names the upstream chosen, if any
                              upstream=str(config.upstreams[0])
                              if len(config.upstreams) == 1 else "",
                              route=config.mount or "/")
        # The route's filters, hooks among them (filters/): empty costs a truth test.
        self.chain = build_chain(config)
        self.metrics: ProxyMetrics | None = None
        # A registry of its own until a router shares one (pools.py); a user's
        # client makes a pool of its own, never shared with another route.
        self.pools = Pools()
        self.pool: Pool[ClientT, TransportT] = (
            self.pools.pool(config, type(self)._new_client) if client is None
            else Pool(config, self.pools.balancer(config), client))
        self.balancer = self.pool.balancer
        if metrics is not False:
            self._start_metrics(None if metrics is True else metrics)

    def _start_metrics(self, registry: CollectorRegistry | None) -> None:
        """Count every request on `registry` (prometheus_client's default: None)."""
        from .metrics import ProxyMetrics

        self.metrics = self._log.observer = ProxyMetrics.on(registry)
        self._watch_pool()

    def _watch_pool(self) -> None:
        """Per upstream: pool use (a request holds one upstream connection while it is in
        flight), summed over the registry's balancers, each once however many routes
        share it; and health as this route's balancer sees it. One series an upstream,
        set by whichever route watched it last."""
        metrics, balancer = self.metrics, self.balancer
        if metrics is None:
            return
        for upstream in self.config.upstreams:
            name = str(upstream)
            metrics.watch_pool(name, functools.partial(self.pools.in_use, name))
            metrics.watch_health(name, functools.partial(balancer.available, upstream))

    def share(self, pools: Pools) -> bool:
        """Take this proxy's pool from `pools`, a router's registry (router.py), so routes
        with equal pool keys share one (pools.py). Not when the proxy has its own
        `client=`, or holds its pool's client already (it keeps its pool): False."""
        with self._lock:
            if not self.pool.owns_client or self._client is not None:
                return False
            self.pools = pools
            self.pool = pools.pool(self.config, type(self)._new_client)
            self.balancer = self.pool.balancer
        self._watch_pool()
        return True

    def _new_client(self) -> tuple[ClientT, TransportT]:
        raise NotImplementedError

    @property
    def client(self) -> ClientT:
        """The upstream client, created on first use (after a pre-fork server has forked,
        inside the running loop for the async face)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    # The pool's, made by its first holder, which starts the pool's
                    # prober (one per balancer: the routes sharing it and a WSGI face's
                    # WebSocket twin), under the lock `_detach_client` takes: a close
                    # racing this access stops what it started.
                    self._client, self._transport = self.pool.acquire(
                        self, self._new_client, self._start_health)
                client = self._client
                assert client is not None
        return client

    @property
    def _health(self) -> Any:
        """The active health prober of this proxy's pool, when it started one."""
        return self.pool.health

    def _start_health(self, client: ClientT, transport: TransportT | None) -> Any:
        """The active health prober (health.py) of this face, started (or None). It
        probes through this `client` or `transport`, never through `self.client`: a
        probe in flight when the face closes must not make a new client (and a new
        prober with it)."""
        raise NotImplementedError

    def _detach_client(self) -> ClientT | None:
        """The client to close: its pool's, when this proxy was the last route holding it
        and the pool made it (the prober stops then); the next request makes another."""
        with self._lock:
            self._client = self._transport = None
            return self.pool.release(self)

    # -- the steps of one request, in order ---------------------------------------------

    def begin(self, incoming: IncomingRequest) -> RequestRecord:
        if not self.config.trusted_proxies:  # client_address's answer, without the call
            return self._log.start(incoming, incoming.peer)
        return self._log.start(incoming, client_address(incoming.headers, self.config,
                                                        incoming.peer))

    def pass_on(self, record: RequestRecord) -> None:
        """The request goes to the fallback app instead (outside the mount)."""
        self._log.pass_on(record)

    def session_opened(self, record: RequestRecord) -> None:
        self._log.session_opened(record)

    def plan(self, incoming: IncomingRequest) -> UpstreamPlan:
        """The core's upstream plan (ProxyError: refuse; NotProxied: outside the mount):
        plan_request's two steps."""
        return build_plan(self.config, incoming, check_request(self.config, incoming,
                                                               self.routes))

    def check(self, incoming: IncomingRequest) -> CheckedRequest:
        """The core's refusals of `plan`, the plan not built yet (`exchange` builds it
        when it is first asked for)."""
        return check_request(self.config, incoming, self.routes)

    def exchange(self, incoming: IncomingRequest, record: RequestRecord,
                 plan: UpstreamPlan | CheckedRequest) -> Exchange:
        """The filters' view of this request, once it is planned or checked (only
        when the route has filters); `finish` runs their `on_end` through `record`.
        Given the check, the plan is built when something first reads
        `exchange.plan`: a filter, or the exchange going upstream (a cache hit
        never does), the same plan whenever it is built."""
        if isinstance(plan, UpstreamPlan):
            exchange = Exchange(incoming, record, plan.mount)
            exchange.plan = plan
        else:
            exchange = Exchange(incoming, record, plan[CHECKED_MOUNT],
                                functools.partial(build_plan, self.config, incoming, plan))
        record.exchange = exchange
        return exchange

    def answer_head(self, exchange: Exchange, answer: Answer) -> ResponseHead:
        """The head of a filter's own answer, before the filters outside it see it."""
        headers = list(answer.headers)
        status = answer.status
        bodiless = status == 204 or status == 304
        if not answer.framed and isinstance(answer.body, bytes) and not bodiless:
            for name, _ in headers:  # framed already? (the length first: cheap)
                if len(name) in (14, 17) and name.lower() in (b"content-length",
                                                              b"transfer-encoding"):
                    break
            else:
                headers.append((b"content-length", str(len(answer.body)).encode()))
        has_body = not bodiless and exchange.incoming.method != "HEAD"
        exchange.record.routed = True
        exchange.record.status = status
        return ResponseHead(status, headers, has_body)  # (positional: a quicker call)

    def choose(self, record: RequestRecord) -> Upstream:
        """The upstream for the first attempt, counted in flight until `finish`
        (marked down or not: marks are a preference, balancer.py)."""
        upstream = self.balancer.choose()
        if upstream is None:
            raise NoUpstream()
        record.upstream = upstream
        return upstream

    def retry(self, record: RequestRecord, plan: UpstreamPlan,
              tried: list[Upstream], exc: BaseException) -> Upstream | None:
        """After `exc` ended the attempt on `record.upstream` before any response
        head: the upstream to try next, or None (then `exc` stands)."""
        failed = record.upstream
        assert failed is not None
        if isinstance(exc, (BadGateway, GatewayTimeout)) and exc.__cause__ is not None:
            exc = exc.__cause__  # a WebSocket handshake's failure, mapped already
        if upstream_failed(exc):
            self.balancer.failed(failed)
        tried.append(failed)
        if len(tried) > self.config.retries or not may_retry(plan, exc):
            return None
        upstream = self.balancer.choose(tried)
        if upstream is None:
            return None
        error_logger.warning("%s %s: %s failed (%s), retrying on %s", plan.method,
                             record.target_text(), failed, describe(exc), upstream)
        self.balancer.release(failed)
        record.upstream = upstream
        return upstream

    def upstream_request(self, plan: UpstreamPlan, content: Any,
                         upstream: Upstream | None = None) -> httpx.Request:
        return build_request(self.config, plan, content, upstream)

    def upstream_call(self, plan: UpstreamPlan, content: Any, upstream: Upstream) -> Call:
        """`upstream_request` as dualproxy's transport takes it directly (`send`): the
        same request line, headers, body and timeouts, without an httpx.Request."""
        method = plan.method
        return Call(_METHOD_BYTES.get(method) or method.upper().encode(), plan.target,
                    attempt_headers(self.config, plan, upstream), request_stream(plan, content),
                    upstream_key(upstream), {"timeout": timeouts(self.config)})

    def response_head(self, record: RequestRecord, plan: UpstreamPlan,
                      request: httpx.Request | Call, response: httpx.Response | Reply,
                      ) -> ResponseHead:
        """The head for the client, before the response hooks (ProxyError: refuse).
        `request` and `response`: httpx's, or a Call and the Reply the transport gave."""
        if isinstance(response, Reply):  # the names as the wire spelled them
            head = response.head
            status, headers, framing, spelled = head.status, head.headers, head.framing, True
        else:
            status, headers = response.status_code, response_header_list(response)
            framing = response.extensions.get(FRAMING)  # dualproxy's transport read it already
            spelled = False
        record.upstream_status(status)
        if record.upstream is not None:
            self.balancer.succeeded(record.upstream)
        enter_body_phase(request, self.config)
        return plan_response(self.config, plan, status, headers,
                             framing if isinstance(framing, Framing) else None, spelled)

    def refuse(self, record: RequestRecord, exc: ProxyError) -> None:
        self._log.problem(record, exc)

    def finish(self, record: RequestRecord) -> None:
        exchange = record.exchange
        if exchange is not None:  # the filters' on_end (the async face ran them already)
            record.exchange = None
            rest = self.chain.end_either(exchange)  # (no generator while none awaits)
            if rest is not None:
                run_sync(rest)  # (refused: an on_end that awaits, on the sync face)
        if record.upstream is not None:
            self.balancer.release(record.upstream)
        self._log.finish(record)


def make_async_client(config: ProxyConfig) -> tuple[httpx.AsyncClient, httpx.AsyncBaseTransport]:
    """The client AsyncProxy creates, and its transport: dualproxy's fast HTTP/1.1 one.

    The face sends through the transport directly: the client's send() adds
    cookie extraction, auth and redirect machinery a proxy never uses.
    """
    from .http1 import AsyncUpstreamTransport
    from .http1.tls import upstream_context

    transport = AsyncUpstreamTransport(
        max_connections=config.max_connections,
        max_keepalive_connections=config.max_keepalive_connections,
        ssl_context=upstream_context(config))
    return httpx.AsyncClient(transport=transport, **client_options(config)), transport


def make_sync_client(config: ProxyConfig) -> tuple[httpx.Client, httpx.BaseTransport]:
    """The client SyncProxy creates, and its transport (see make_async_client)."""
    from .http1 import UpstreamTransport
    from .http1.tls import upstream_context

    transport = UpstreamTransport(
        max_connections=config.max_connections,
        max_keepalive_connections=config.max_keepalive_connections,
        ssl_context=upstream_context(config))
    return httpx.Client(transport=transport, **client_options(config)), transport
