"""The fault harness (tests/chaos) can fail: broken setups it must report.

A check that cannot fail is a defect. A relay between the proxy and the chaos upstream
breaks what a proxy must keep (it passes an upstream's reset on as a clean end, or keeps
the upstream's side of a connection the proxy closed), and a short run of the harness
must name the violation with its seed, scenario and request id. The checks themselves are
also fed hand-made notes, one per violation class.
"""

from __future__ import annotations

import socket
import threading

import pytest

from tests.chaos import harness
from tests.chaos.checks import Violation, check_records, check_upstream_conns
from tests.chaos.clients import EMPTY_SHA, Sent
from tests.chaos.harness import Result, Settings, run
from tests.chaos.upstream import Conn, Exchange

SEED = 1717


class BrokenRelay:
    """A TCP relay in front of the upstream that breaks one promise, on purpose.

    `rst-as-fin`: an upstream's RST reaches the proxy as a FIN (a cut close-delimited
    body looks complete). `hold`: when the proxy closes, the upstream's side stays open
    and is read on (a proxy that never closes upstream requests its clients left)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.socks: list[socket.socket] = []
        self.target = 0

    def start(self, target: int) -> int:
        self.target = target
        threading.Thread(target=self._accept, daemon=True).start()
        return int(self.listener.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            self.socks += [down, up]
            threading.Thread(target=self._pump, args=(up, down, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(down, up, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_upstream: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:  # an RST: a relay that is not broken would reset dst too
                data = b""
            if not data:
                break
            try:
                dst.sendall(data)
            except OSError:
                if self.mode == "hold" and from_upstream:
                    continue  # read on, as if the proxy were still there
                break
        if self.mode == "hold" and not from_upstream:
            return
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for sock in self.socks:
            sock.close()


def short_run(pairing: str, relay: BrokenRelay, *, client: tuple[str, ...],
              upstream: tuple[str, ...]) -> tuple[Result, list[str]]:
    lines: list[str] = []
    settings = Settings(pairing, seconds=3, seed=SEED, clients=3, timeout=1, idle_timeout=2,
                        only_client=client, only_upstream=upstream, settle_slack=2,
                        wrap_upstream=relay.start)
    try:
        return run(settings, out=lines.append), lines
    finally:
        relay.close()


def reported(result: Result, lines: list[str], check: str) -> Violation:
    """The first violation of `check`, after asserting it was printed as a replayable line."""
    found = [v for v in result.violations if v.check == check]
    assert found, f"{check} not reported:\n" + "\n".join(lines)
    first = found[0]
    assert any(line.startswith(f"VIOLATION {check}:") and f"seed={SEED}" in line
               and f"scenario={first.scenario!r}" in line for line in lines)
    return first


def test_a_cut_body_passed_off_as_complete_is_reported(pairing: str) -> None:
    result, lines = short_run(pairing, BrokenRelay("rst-as-fin"), client=("ok",),
                              upstream=("close-rst", "reset"))
    found = reported(result, lines, "cut-passed-as-complete")
    assert found.scenario.startswith(("ok/close-rst", "ok/reset"))
    assert found.rid is not None and found.rid.startswith(f"{SEED}-")


def test_an_upstream_request_kept_after_its_client_left_is_reported(pairing: str) -> None:
    result, lines = short_run(pairing, BrokenRelay("hold"), client=("leave-mid-body",),
                              upstream=("endless",))
    found = reported(result, lines, "upstream-busy")
    assert found.scenario.startswith("leave-mid-body/endless")


def test_main_exits_non_zero_and_prints_the_seed_when_a_check_fails(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    failing = Result(violations=[Violation("lost-answer", "ok/ok", "5-c-1", "made up")])
    monkeypatch.setattr(harness, "run", lambda settings, out: failing)
    assert harness.main(["--seconds", "1", "--seed", "5", "--pairing", "asgi-uvicorn"]) == 1
    out = capsys.readouterr().out
    assert "seed=5" in out
    assert "(replay: nox -s chaos -- --seconds 1 --pairing asgi-uvicorn --seed 5)" in out
    monkeypatch.setattr(harness, "run", lambda settings, out: Result())
    assert harness.main(["--seconds", "1", "--seed", "5", "--pairing", "asgi-uvicorn"]) == 0


# -- the checks on hand-made notes: each class fires, and a clean exchange is clean


def sent(**kw: object) -> Sent:
    base = dict(rid="1-c-1", scenario="ok/ok size=3 framing=cl", method="GET", target="/x",
                head_sent=True, body_sha=EMPTY_SHA, t_sent=0.0, status=200, resp_rid="1-c-1",
                resp_len=3, resp_sha="abc", resp_complete=True, head_wait=0.1)
    base.update(kw)
    return Sent(**base)  # type: ignore[arg-type]


def upstream_saw(**kw: object) -> Exchange:
    base = dict(rid="1-c-1", behaviour="ok size=3 framing=cl", conn=0, method="GET",
                target="/x", t_head=0.0, req_complete=True, req_sha=EMPTY_SHA, status=200,
                resp_len=3, resp_sha="abc", resp_complete=True, resp_clean=True)
    base.update(kw)
    return Exchange(**base)  # type: ignore[arg-type]


CASES = {
    "clean": ([sent()], [upstream_saw()]),
    "cut-passed-as-complete": ([sent()], [upstream_saw(resp_complete=False,
                                                       resp_clean=False)]),
    "answer-mismatch": ([sent(resp_sha="abd")], [upstream_saw()]),
    "crossed-answer": ([sent(resp_rid="1-c-9")], [upstream_saw(resp_clean=False)]),
    "unexpected-status": ([sent(resp_rid=None, status=500, resp_complete=False)],
                          [upstream_saw(resp_clean=False)]),
    "head-deadline": ([sent(head_wait=60.0)], [upstream_saw()]),
    "body-stall": ([sent(body_gap=60.0)], [upstream_saw()]),
    "upload-stall": ([sent(stall_wait=60.0, left="stalled its upload", body_sha=None)],
                     [upstream_saw(req_complete=False)]),
    "lost-answer": ([sent(resp_complete=False)], [upstream_saw()]),
    "unsent-request": ([sent()], [upstream_saw(), upstream_saw(rid="1-c-7")]),
    "cut-upload-completed": ([sent(body_sha=None, left="upload at 5/9")], [upstream_saw()]),
    "upload-mismatch": ([sent()], [upstream_saw(req_sha="0" * 64)]),
    "stale-reuse": ([sent()], [upstream_saw(stale=9.0)]),
    "oversized-head-forwarded": ([sent(scenario="huge-head/ok size=3 framing=cl")],
                                 [upstream_saw()]),
    "malformed-upstream-request": ([sent()], [upstream_saw(error="bad header line")]),
}


@pytest.mark.parametrize("case", CASES)
def test_each_record_check_fires_on_its_own_fault(case: str) -> None:
    clients, exchanges = CASES[case]
    found = {v.check for v in check_records(clients, exchanges, head_bound=10.0, gap_bound=10.0,
                                             stall_bound=10.0)}
    assert found == (set() if case == "clean" else {case})


def test_the_connection_checks_fire() -> None:
    busy = Conn(1, 0.0, busy="answering", rid="1-c-1", behaviour="endless", since=0.0)
    kept = Conn(2, 0.0, fin_at=1.0)
    idle = Conn(3, 0.0)
    closed = Conn(4, 0.0, closed=2.0, busy="answering")
    found = check_upstream_conns([busy, kept, idle, closed], 100.0, fin_grace=5.0)
    assert [(v.check, v.rid) for v in found] == [("upstream-busy", "1-c-1"),
                                                  ("pooled-after-fin", None)]
    assert [v.check for v in check_upstream_conns([kept], 100.0, fin_grace=None)] == []
