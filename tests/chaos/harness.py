"""One chaos run: a proxy of a pairing, the chaos upstream, a storm of clients, the checks.

    python -m tests.chaos [--seconds 60] [--seed N] [--pairing asgi-uvicorn ...]

The run prints its seed first; the same seed replays the same scenarios in the same client
threads under the same request ids (`--seed N`; timing differs, so a race may take a few
replays). It exits non-zero when any check failed, each violation printed with its pairing,
seed, scenario (client behaviour / upstream behaviour) and request id (SEED-THREAD-N).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.chaos.checks import Violation, check_records, check_upstream_conns
from tests.chaos.clients import Clients, Plan, Reader, Sent
from tests.chaos.scenarios import CLIENT_MIX, UPSTREAM_MIX, WS_MIX, Draw, Limits
from tests.chaos.upstream import ChaosUpstream
from tests.conftest import PAIRINGS, ROOT, ProxyProcess, free_port
from tests.proctree import open_fds, thread_count

FD_SLACK = 8         # descriptors a proxy may open lazily after the warm-up (log, metrics)
THREAD_SLACK = 2
PROMPT = 15.0        # "promptly": a plain GET answered within this, however loaded the machine
FIN_GRACE = 5.0      # an upstream-closed connection kept longer than this was not noticed


@dataclass
class Settings:
    """One run's parameters (the CLI's flags)."""

    pairing: str
    seconds: float = 60.0
    seed: int = 0
    clients: int = 10
    timeout: float = 2.0
    idle_timeout: float = 3.0
    pool_timeout: float = 5.0
    graceful_timeout: float = 5.0
    only_client: tuple[str, ...] | None = None
    only_upstream: tuple[str, ...] | None = None
    proxy_flags: tuple[str, ...] = ()
    # Seconds beyond --timeout + --idle-timeout for the upstream's connections to settle.
    settle_slack: float = 10.0
    # --client-timeout, when the proxy has the flag (then a stalled upload must be answered
    # or cut by it + slack).
    client_timeout: float = 3.0
    # An answer head (or the proxy's 504) must come by --timeout + slack, the next body
    # bytes (or the abort) by --idle-timeout + slack: generous, for a loaded machine.
    slack: float = 8.0
    # Put something between the proxy and the upstream: takes the upstream's port, returns
    # the port the proxy should use (the harness's own tests put a broken relay there).
    wrap_upstream: Callable[[int], int] | None = None


@dataclass
class Result:
    """What a run found."""

    violations: list[Violation] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def checks(self) -> collections.Counter[str]:
        return collections.Counter(v.check for v in self.violations)


def metric(text: str, name: str) -> float | None:
    """The sum of every sample of `name` in a Prometheus exposition, or None if absent."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


@functools.cache
def has_flag(flag: str) -> bool:
    """Does `dualproxy serve` take this flag? (The harness runs on trees with and without.)"""
    helptext = subprocess.run([sys.executable, "-m", "dualproxy", "serve", "--help"],
                              capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return re.search(rf"[\s\[]{re.escape(flag)}[\s\]=]", helptext) is not None


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


class Run:
    """One pairing's run; `execute()` returns the Result."""

    def __init__(self, settings: Settings, out: Callable[[str], None] = print) -> None:
        self.s = settings
        self.out = out
        self.result = Result()
        self.limits = Limits(settings.timeout, settings.idle_timeout)
        self.head_bound = settings.timeout + settings.slack
        self.gap_bound = settings.idle_timeout + settings.slack

    def violation(self, check: str, scenario: str, rid: str | None, detail: str) -> None:
        self.result.violations.append(Violation(check, scenario, rid, detail))

    def execute(self) -> Result:
        s = self.s
        upstream = ChaosUpstream().start()
        port = s.wrap_upstream(upstream.port) if s.wrap_upstream else upstream.port
        self.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        flags = ("--timeout", str(s.timeout), "--idle-timeout", str(s.idle_timeout),
                 "--pool-timeout", str(s.pool_timeout),
                 "--graceful-timeout", str(s.graceful_timeout),
                 "--metrics-bind", self.metrics_url.split("/")[2])
        self.stall_bound: float | None = None
        if has_flag("--client-timeout"):
            flags += ("--client-timeout", str(s.client_timeout))
            self.stall_bound = s.client_timeout + s.slack
        else:
            self.result.notes.append("the proxy has no --client-timeout: stalled uploads are "
                                     "not held to a bound")
        flags += s.proxy_flags
        proxy = ProxyProcess(s.pairing, f"http://127.0.0.1:{port}", flags)
        self.clients = Clients(proxy.port, s.seed)
        try:
            self._storm(proxy, upstream)
        finally:
            self._shutdown(proxy, upstream)
            upstream.stop()
        return self.result

    # -- the phases

    def _warm(self, proxy: ProxyProcess) -> None:
        """Enough concurrent slow requests to start every worker thread the server makes."""
        threads = [threading.Thread(target=self.clients.run_plans, args=(
            "warm", [Plan(target="/warm", up="stall-head seconds=0.3 size=10")]),
            name=f"warm{i}") for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    def _storm(self, proxy: ProxyProcess, upstream: ChaosUpstream) -> None:
        s, clients = self.s, self.clients
        self._warm(proxy)
        time.sleep(0.5)
        pid = proxy.proc.pid
        fds0 = open_fds(pid) - len(upstream.open_conns())
        threads0 = thread_count(pid)
        self.out(f"  warm: {len(clients.sent)} requests, proxy fds {fds0} (besides upstream "
                 f"connections), threads {threads0}")

        def worker(index: int) -> None:
            draw = Draw(random.Random(f"{s.seed}-{index}"), self.limits,
                        s.only_client, s.only_upstream)
            while not clients.stop.is_set():
                scenario = draw.next(clients)
                try:
                    scenario()
                except Exception:  # a bug of the harness: loud, never a silent lost client
                    self.violation("harness-error", "?", None,
                                   traceback.format_exc().replace("\n", " | "))

        workers = [threading.Thread(target=worker, args=(i,), name=f"t{i}", daemon=True)
                   for i in range(s.clients)]
        canary = threading.Thread(target=self._canary, args=(proxy,), name="canary",
                                  daemon=True)
        started = len(clients.sent)
        for t in [*workers, canary]:
            t.start()
        clients.stop.wait(s.seconds)
        clients.stop.set()
        for t in [*workers, canary]:
            t.join(5)
        clients.cut_all()
        for t in [*workers, canary]:
            t.join(20)
            if t.is_alive():
                self.violation("client-stuck", "?", None, f"{t.name} still blocked 25 s "
                               "after the storm ended and its sockets were shut down")
        self.out(f"  storm: {len(clients.sent) - started} requests in {s.seconds:.0f} s")
        if not proxy.alive():
            self.violation("proxy-died", "?", None, f"exit status {proxy.proc.returncode}")
            return

        # Every client is gone: the upstream must see its connections idle or closed.
        # The asyncio driver reads its idle connections, so it sees an upstream's FIN.
        fin_grace = FIN_GRACE if s.pairing.startswith("asgi") else None
        settle = s.timeout + s.idle_timeout + s.settle_slack
        wait_for(lambda: not check_upstream_conns(upstream.conns(), time.monotonic(),
                                                  fin_grace=fin_grace), settle)
        scenario = {x.rid: x.scenario for x in clients.sent}
        for v in check_upstream_conns(upstream.conns(), time.monotonic(), fin_grace=fin_grace):
            self.result.violations.append(Violation(
                v.check, scenario.get(v.rid or "", v.scenario), v.rid, v.detail))

        self._probe(proxy, "final-probe")
        self._check_metrics()
        fds1 = open_fds(pid) - len(upstream.open_conns())
        threads1 = thread_count(pid)
        self.out(f"  after: proxy fds {fds1} (besides upstream connections), threads {threads1}")
        if fds1 > fds0 + FD_SLACK:
            self.violation("fd-leak", "?", None, f"proxy descriptors besides upstream "
                           f"connections {fds0} -> {fds1} (slack {FD_SLACK})")
        if threads1 > threads0 + THREAD_SLACK:
            self.violation("thread-leak", "?", None, f"proxy threads {threads0} -> {threads1}")
        self.result.violations += check_records(clients.sent, upstream.exchanges(),
                                                head_bound=self.head_bound,
                                                gap_bound=self.gap_bound,
                                                stall_bound=self.stall_bound)
        self.result.sent = clients.sent
        self.exchanges = upstream.exchanges()
        answers = sum(1 for x in clients.sent if x.resp_complete and x.resp_rid == x.rid)
        uploads = sum(1 for ex in self.exchanges if ex.req_complete and ex.req_len)
        self.out(f"  compared: {answers} complete answers and {uploads} complete uploads by "
                 f"sha256, {len(self.exchanges)} upstream requests by id; "
                 f"{len(upstream.conns())} upstream connections")

    def _canary(self, proxy: ProxyProcess) -> None:
        """A plain GET every second through the storm: the proxy keeps answering others."""
        while not self.clients.stop.wait(1.0):
            self._probe(proxy, "canary")

    def _probe(self, proxy: ProxyProcess, check: str) -> None:
        clients = self.clients
        sent = clients.note(Sent(clients.new_id(check), "canary/ok size=1000", "GET",
                                 "/probe"))
        t0 = time.monotonic()
        try:
            sock = clients.connect(timeout=PROMPT + 30)
        except OSError as exc:
            self.violation(check, sent.scenario, sent.rid, f"connect failed: {exc!r}")
            return
        try:
            plan = Plan(target="/probe", up="ok size=1000", probe=True)
            clients.request(sock, Reader(sock), plan, sent)
        finally:
            clients.close(sock)
        took = time.monotonic() - t0
        # In the storm a 503 (the pool full, a cap reached) is a prompt answer too; after it,
        # every slot must be free again.
        fine = (200, 503) if check == "canary" else (200,)
        if sent.status not in fine or not sent.resp_complete or took > PROMPT:
            if check == "canary" and clients.stop.is_set() and sent.left:
                return  # cut by the end of the storm
            self.violation(check, sent.scenario, sent.rid,
                           f"a plain GET got {sent.status} "
                           f"({'complete' if sent.resp_complete else 'incomplete'}, "
                           f"{sent.error or sent.left or 'no error'}) after {took:.1f} s "
                           f"(bound {PROMPT:.0f} s)")

    def _check_metrics(self) -> None:
        got: dict[str, float | None] = {}

        def settled() -> bool:
            try:
                text = httpx.get(self.metrics_url, timeout=10).text
            except httpx.HTTPError as exc:
                got["error"] = None
                self.result.notes.append(f"metrics: {exc!r}")
                return False
            for name in ("dualproxy_requests_in_flight", "dualproxy_pool_connections_in_use",
                         "dualproxy_websocket_sessions"):
                got[name] = metric(text, name)
            return all(v == 0 for v in got.values())

        if wait_for(settled, 10.0):
            return
        for name, value in got.items():
            if value != 0:
                self.violation("metrics", "?", None, f"{name} is {value} with every client "
                               "gone (want 0)")

    def _shutdown(self, proxy: ProxyProcess, upstream: ChaosUpstream) -> None:
        """SIGTERM: the proxy exits 0 within the graceful timeout (and some), the upstream
        sees every connection closed; no traceback in the proxy's log."""
        t0 = time.monotonic()
        proxy.stop()
        took = time.monotonic() - t0
        rc = proxy.proc.returncode
        if rc != 0 or took > self.s.graceful_timeout + 10:
            self.violation("shutdown", "?", None, f"SIGTERM: exit status {rc} after {took:.1f} s")
        if not wait_for(lambda: not upstream.open_conns(), 10.0):
            self.violation("upstream-conn-open", "?", None,
                           f"{len(upstream.open_conns())} upstream connections still open "
                           "10 s after the proxy stopped")
        log = proxy.log()
        if "Traceback" in log:
            at = log.index("Traceback")
            self.violation("traceback-in-log", "?", None, log[at:at + 800].replace("\n", " | "))
        if self.result.violations:  # kept for a look: the proxy's log and every note
            fd, name = tempfile.mkstemp(prefix=f"chaos-{self.s.pairing}-{self.s.seed}-",
                                        suffix=".log")
            with os.fdopen(fd, "w") as f:
                f.write(log)
            dump = Path(name).with_suffix(".notes.jsonl")
            with dump.open("w") as f:
                for sent in self.clients.sent:
                    f.write(json.dumps({"client": dataclasses.asdict(sent)}, default=repr) + "\n")
                for ex in getattr(self, "exchanges", []):
                    f.write(json.dumps({"upstream": dataclasses.asdict(ex)}) + "\n")
            self.result.notes.append(f"proxy log: {name}; notes: {dump}")


def run(settings: Settings, out: Callable[[str], None] = print) -> Result:
    """One pairing's run, its violations printed as found at the end."""
    out(f"chaos: pairing={settings.pairing} seed={settings.seed} seconds={settings.seconds:g}")
    result = Run(settings, out).execute()
    for v in result.violations:
        out(v.line(settings.pairing, settings.seed))
    for note in result.notes:
        out(f"  {note}")
    counts = collections.Counter(x.scenario.split(" ")[0] for x in result.sent)
    out(f"  scenarios: {dict(sorted(counts.items()))}")
    summary = ", ".join(f"{k}={n}" for k, n in sorted(result.checks.items())) or "clean"
    out(f"  {settings.pairing}: {summary}")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="length of the storm per pairing (default: 60)")
    parser.add_argument("--seed", type=int, default=None,
                        help="replay this seed (default: a random one, printed)")
    parser.add_argument("--pairing", action="append", choices=PAIRINGS, default=[],
                        help="run this pairing (repeatable; default: all four)")
    parser.add_argument("--clients", type=int, default=10,
                        help="concurrent client threads (default: 10)")
    parser.add_argument("--client-mix", default=None,
                        help=f"comma-separated client behaviours only, of {sorted(CLIENT_MIX)}")
    parser.add_argument("--upstream-mix", default=None,
                        help="comma-separated upstream behaviours only, of "
                             f"{sorted(UPSTREAM_MIX) + sorted(WS_MIX)}")
    parser.add_argument("--slack", type=float, default=8.0,
                        help="seconds beyond the proxy's --timeout (--idle-timeout) by which "
                             "an answer head (more body) must come; raise it on a loaded "
                             "machine (default: 8)")
    parser.add_argument("--pool-pressure", action="store_true",
                        help="a pool of 2 upstream connections with 10 ms waits and at least "
                             "30 clients, so the pool's hand-offs and timeouts race (default: "
                             "the proxy's pool of 100, 5 s waits)")
    parser.add_argument("--proxy-flag", action="append", default=[],
                        help="an extra `dualproxy serve` argument (repeatable), e.g. "
                             "--proxy-flag=--max-connections=4 to make the pool's waits and "
                             "timeouts part of the storm")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    pairings = args.pairing or list(PAIRINGS)

    def replay(pairing: str | None = None) -> str:
        """The command that runs this again: the same arguments, this seed (and pairing)."""
        given = sys.argv[1:] if argv is None else argv
        kept = [a for i, a in enumerate(given) if not a.startswith("--seed")
                and not (i and given[i - 1] == "--seed")]
        if pairing is not None and not args.pairing:
            kept += ["--pairing", pairing]
        return shlex.join(["nox", "-s", "chaos", "--", *kept, "--seed", str(seed)])

    print(f"chaos: seed={seed} (replay: {replay()})", flush=True)

    def mix(value: str | None, known: set[str]) -> tuple[str, ...] | None:
        if not value:
            return None
        names = tuple(value.split(","))
        if set(names) - known:
            sys.exit(f"chaos: unknown behaviour(s) {sorted(set(names) - known)}")
        return names

    flags, clients = tuple(args.proxy_flag), args.clients
    if args.pool_pressure:
        flags, clients = ("--max-connections=2", "--pool-timeout=0.01", *flags), max(clients, 30)
    failed: dict[str, collections.Counter[str]] = {}
    for pairing in pairings:
        result = run(Settings(pairing, args.seconds, seed, clients,
                              only_client=mix(args.client_mix, set(CLIENT_MIX)),
                              only_upstream=mix(args.upstream_mix,
                                                set(UPSTREAM_MIX) | set(WS_MIX)),
                              proxy_flags=flags, slack=args.slack),
                     out=lambda line: print(line, flush=True))
        if result.violations:
            failed[pairing] = result.checks
    if failed:
        for pairing, checks in failed.items():
            print(f"chaos: FAILED {pairing} seed={seed}: {dict(checks)} "
                  f"(replay: {replay(pairing)})")
        return 1
    print(f"chaos: clean on {', '.join(pairings)} (seed {seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
