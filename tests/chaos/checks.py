"""The checks made from outside once the storm is over, as pure functions of the notes.

The clients' notes (`Sent`) and the upstream's (`Exchange`, `Conn`) are compared:
nothing a client received as complete was cut upstream, no upload cut by its client was
completed upstream, no answer went to another request, nothing reached the upstream that no
client sent, and every answer the upstream wrote whole reached a client that stayed for it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from tests.chaos.clients import Sent
from tests.chaos.scenarios import CLEAN
from tests.chaos.upstream import Conn, Exchange, spec_of

# Answers the proxy may make itself (problem+json), besides relaying the upstream's.
PROXY_STATUSES = frozenset({400, 408, 413, 429, 431, 502, 503, 504})
# Client behaviours that read an answer to its end at full speed or close to it.
STAYING = frozenset({"ok", "pipeline", "slow-send", "slow-read", "trickle-head", "canary"})
# A request reaching the upstream this long after the upstream's FIN on that connection:
# the proxy kept a connection in its pool that the upstream had closed long before.
STALE_AFTER = 2.0


@dataclass(frozen=True)
class Violation:
    """One failed check, with what caused it."""

    check: str
    scenario: str
    rid: str | None
    detail: str

    def line(self, pairing: str, seed: int) -> str:
        return (f"VIOLATION {self.check}: pairing={pairing} seed={seed} "
                f"scenario={self.scenario!r} id={self.rid}: {self.detail}")


def check_records(sent: list[Sent], exchanges: list[Exchange], *, head_bound: float,
                  gap_bound: float, stall_bound: float | None = None) -> list[Violation]:
    """Compare what the clients sent and received with what the upstream saw and wrote.
    `stall_bound`: a stalled upload is answered or cut by then (None: not checked)."""
    out: list[Violation] = []
    by_rid: dict[str, list[Exchange]] = collections.defaultdict(list)
    for ex in exchanges:
        if ex.rid is not None:
            by_rid[ex.rid].append(ex)
    notes = {s.rid: s for s in sent}
    for s in sent:
        out += _check_answer(s, by_rid.get(s.rid, []), head_bound, gap_bound)
        if stall_bound is not None and s.stall_wait is not None and s.stall_wait > stall_bound:
            out.append(Violation("upload-stall", s.scenario, s.rid, f"a stalled upload was "
                                 f"neither answered nor cut for {s.stall_wait:.1f} s (bound "
                                 f"{stall_bound:.0f} s: --client-timeout and a slack)"))
    for ex in exchanges:
        out += _check_arrival(ex, notes.get(ex.rid or ""))
    return out


def _check_answer(s: Sent, seen: list[Exchange], head_bound: float,
                  gap_bound: float) -> list[Violation]:
    out: list[Violation] = []

    def bad(check: str, detail: str) -> None:
        out.append(Violation(check, s.scenario, s.rid, detail))

    if s.resp_rid is not None and s.resp_rid != s.rid and s.status != 101:
        bad("crossed-answer", f"got the answer to request {s.resp_rid}")
    if s.resp_rid is None and s.status is not None and s.status not in PROXY_STATUSES \
            and s.status != 101:
        bad("unexpected-status", f"the proxy answered {s.status} itself "
            f"({s.ctype}): {s.body_start[:200]!r}")
    if b"Traceback" in s.body_start:
        bad("traceback-to-client", repr(s.body_start[:300]))
    if s.head_wait is not None and s.head_wait > head_bound:
        bad("head-deadline", f"waited {s.head_wait:.1f} s for an answer head "
            f"(bound {head_bound:.0f} s: --timeout and a slack)")
    if s.body_gap > gap_bound:
        bad("body-stall", f"waited {s.body_gap:.1f} s for more of the answer's body "
            f"(bound {gap_bound:.0f} s: --idle-timeout and a slack)")
    if s.resp_complete and s.resp_rid == s.rid and s.status != 101:
        whole = [ex for ex in seen if ex.resp_complete]
        if not whole:
            sent_up = max((ex.resp_len for ex in seen), default=0)
            bad("cut-passed-as-complete", f"the client got a complete {s.resp_len}-byte "
                f"answer; the upstream never finished it (wrote {sent_up} bytes; "
                f"{'reset' if any(ex.status and not ex.resp_clean for ex in seen) else 'cut'})")
        elif not any(ex.resp_sha == s.resp_sha for ex in whole):
            bad("answer-mismatch", f"the client's {s.resp_len} bytes differ from the "
                f"upstream's {whole[0].resp_len}")
    if (s.client_behaviour in STAYING and s.left is None and s.error is None
            and spec_of(s.upstream_behaviour)[0] in CLEAN
            and any(ex.resp_clean and ex.req_complete for ex in seen)
            and not (s.resp_complete and s.resp_rid == s.rid)):
        got = f"{s.status} {'complete' if s.resp_complete else 'cut'} {s.resp_len} bytes" \
            if s.status is not None else f"no answer ({s.error})"
        bad("lost-answer", f"the upstream wrote its whole answer; the client, who stayed, "
            f"got {got}")
    return out


def _check_arrival(ex: Exchange, s: Sent | None) -> list[Violation]:
    """One request the upstream saw against what its client sent."""
    scenario = s.scenario if s is not None else f"?/{ex.behaviour}"
    out: list[Violation] = []

    def bad(check: str, detail: str) -> None:
        out.append(Violation(check, scenario, ex.rid, detail))

    if ex.error is not None:
        bad("malformed-upstream-request", f"{ex.method} {ex.target}: {ex.error}")
    if s is None or not s.head_sent:
        why = "no client sent this id" if s is None else "its head was never sent whole"
        bad("unsent-request", f"the upstream got {ex.method} {ex.target!r} (connection "
            f"{ex.conn}); {why}")
        return out
    if s.client_behaviour == "huge-head":
        bad("oversized-head-forwarded", "a request head past the proxy's limits (32 KiB, "
            "100 fields) reached the upstream")
    if (ex.method, ex.target) != (s.method, s.target):
        bad("unsent-request", f"the upstream got {ex.method} {ex.target!r}; the client sent "
            f"{s.method} {s.target!r}")
    if ex.req_complete and s.body_sha is None:
        bad("cut-upload-completed", f"the upstream received a complete {ex.req_len}-byte "
            f"body; the client left ({s.left or s.error})")
    elif ex.req_complete and ex.req_sha != s.body_sha:
        bad("upload-mismatch", f"the upstream's {ex.req_len} body bytes differ from what "
            f"the client sent")
    if ex.stale is not None and ex.stale > STALE_AFTER:
        bad("stale-reuse", f"sent on an upstream connection the upstream had closed "
            f"{ex.stale:.1f} s before")
    return out


def check_upstream_conns(conns: list[Conn], now: float, *,
                         fin_grace: float | None) -> list[Violation]:
    """Connections still busy once every client is gone, or kept open `fin_grace` seconds
    after the upstream closed them (None: not checked; a sync pool only looks at an idle
    connection when it takes it, as urllib3 does)."""
    out: list[Violation] = []
    for c in conns:
        if c.closed is not None:
            continue
        if c.fin_at is not None and fin_grace is not None and now - c.fin_at > fin_grace:
            out.append(Violation("pooled-after-fin", f"?/{c.behaviour}", c.rid,
                                 f"upstream connection {c.n} still open {now - c.fin_at:.0f} s "
                                 f"after the upstream closed it"))
        elif c.busy is not None and c.fin_at is None:
            out.append(Violation("upstream-busy", f"?/{c.behaviour}", c.rid,
                                 f"upstream connection {c.n} still {c.busy} "
                                 f"{now - c.since:.0f} s after it began, every client gone"))
    return out
