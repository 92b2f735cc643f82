"""The test matrix and the other sessions.

`nox` runs the default sessions: `suite`, which runs the behaviour tests (those
that take a pairing) for every face x server pairing on Python 3.11, the rest of
the suite once (`unit`) and, on 3.10, 3.12 and 3.13, the tests whose outcome can
differ between Python versions (`versions`), two runs at a time; then ruff, mypy
--strict, and the docs site's strict build. One cell alone: `nox -s "tests(wsgi-gunicorn)"`,
`nox -s unit`, `nox -s versions-3.13`.
nox finds the interpreters on PATH as `python3.X` (`.ci/run` puts pyenv's there).
"""

from __future__ import annotations

import os

import nox

# `versions` runs inside `suite`, beside the pairings (it is listed there, not here).
nox.options.sessions = ["suite", "lint", "types", "docs"]
nox.options.reuse_existing_virtualenvs = True

PAIRINGS = [("asgi", "uvicorn"), ("wsgi", "gunicorn"), ("wsgi", "uvicorn"), ("asgi", "gunicorn"),
            ("asgi", "granian"), ("wsgi", "granian")]
PYTHON = "3.11"  # every pairing runs the behaviour tests on this one, `unit` the rest
OTHER_PYTHONS = ["3.10", "3.12", "3.13"]  # requires-python >= 3.10; 3.13 the newest tested
# What Python's own version can change (asyncio's wait_for and cancellation, its SSL
# transport, signals and threads): the HTTP/1.1 drivers and their pool, upstream faults
# and the health prober, the drain; both faces, on one pairing each. uvloop's loop is
# its own code, not the Python's: it runs on PYTHON only. About 3 minutes a Python.
VERSION_TESTS = ["tests/test_transport.py", "tests/test_upstream_faults.py",
                 "tests/test_drain.py", "tests/test_waits.py", "-k", "not uvloop"]
VERSION_PAIRINGS = "asgi-uvicorn,wsgi-gunicorn"


def tests_impl(session: nox.Session, adapter: str, server: str) -> None:
    session.install("-e", ".[dev]")
    session.run(
        "pytest", *session.posargs,
        # Only the tests that take a pairing: the others run once, in `unit`.
        env={"DUALPROXY_PAIRINGS": f"{adapter}-{server}", "DUALPROXY_SUITE_PART": "pairings"},
    )


@nox.session(python=PYTHON)
@nox.parametrize(("adapter", "server"), PAIRINGS, ids=[f"{a}-{s}" for a, s in PAIRINGS])
def tests(session: nox.Session, adapter: str, server: str) -> None:
    """The behaviour tests (those that take a pairing) against one face x server pairing."""
    tests_impl(session, adapter, server)


@nox.session(python=PYTHON)
def unit(session: nox.Session) -> None:
    """The tests that take no pairing (the core, the HTTP/1.1 client, the CLI, the
    harnesses' own checks...), once rather than in every pairing's session."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs, env={"DUALPROXY_SUITE_PART": "unit"})


@nox.session(python=PYTHON)
def suite(session: nox.Session) -> None:
    """Every pairing's behaviour tests, the unit tests and the `versions` sessions (as
    `nox -s versions-3.X`), as separate runs two at a time (tests/parallel.py: each mostly
    waits on sockets and servers). `DUALPROXY_JOBS` sets how many at once; `nox -s suite
    -- -x` passes pytest options to every part."""
    session.install("-e", ".[dev]")
    parts = ([f"{adapter}-{server}" for adapter, server in PAIRINGS] + ["unit"]
             + [f"versions-{version}" for version in OTHER_PYTHONS])
    session.run("python", "-m", "tests.parallel", "--jobs", os.environ.get("DUALPROXY_JOBS", "2"),
                "--pytest", " ".join(session.posargs), *parts)


@nox.session(python=OTHER_PYTHONS)
def versions(session: nox.Session) -> None:
    """The tests that can differ between Python versions, on the other Pythons.

    `nox -s versions-3.12 -- -k pool` passes pytest options on.
    """
    session.install("-e", ".[dev]")
    session.run("pytest", "-p", "no:cacheprovider", *VERSION_TESTS, *session.posargs,
                env={"DUALPROXY_PAIRINGS": VERSION_PAIRINGS})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, examples, the docs hooks and this file."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "dualproxy", "tests", "examples", "docs/hooks", "noxfile.py")


@nox.session
def types(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict", "dualproxy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site (mkdocs.yml) with --strict: a broken link or anchor,
    a page left out of the nav or a missing included file fails. The CLI reference is
    rendered from the parser as it builds. `nox -s docs -- serve` to preview it instead."""
    session.install("-e", ".[docs]")
    env = {"NO_MKDOCS_2_WARNING": "1"}  # material's banner about its successor, every build
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:], env=env)
        return
    site = os.path.join(session.create_tmp(), "site")
    session.run("mkdocs", "build", "--strict", "--site-dir", site, env=env)


@nox.session
def demo(session: nox.Session) -> None:
    """Run `dualproxy demo` (Ctrl-C to stop)."""
    session.install("-e", ".[all]")
    session.run("dualproxy", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side benchmark against the baseline contestants (not in CI).

    `nox -s bench -- --quick` for a short run, `-- --only dp-asgi seed` for some
    contestants, `-- --ws-only` / `-- --no-ws` for the WebSocket rows alone or none,
    `-- --baseline-tree DIR` to run dualproxy from another checkout in the same run
    (dp-asgi-before, dp-wsgi-before), `-- --chart bench/results/latest.json` to redraw
    the chart from a results file without measuring. Uses wrk and nginx when installed
    (`apt-get install wrk nginx-light`), else built-in stand-ins. Writes
    bench/results/latest.{json,png}; a full run also copies the chart to
    docs/bench.png for the README. The peers (fastapi-proxy-lib, werkzeug via
    Flask) and matplotlib are bench-only dependencies, never the package's.
    """
    session.install("-e", ".[all]", "fastapi-proxy-lib==0.3.0", "matplotlib")
    session.run("python", "bench/run.py", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """100k mixed requests through both faces; errors, RSS drift, fds (not in CI).

    `nox -s soak -- --requests 5000` for a short run.
    """
    session.install("-e", ".[all]")
    session.run("python", "bench/soak.py", *session.posargs)


@nox.session
def chaos(session: nox.Session) -> None:
    """The fault harness: for each pairing a seeded storm of clients that leave, dawdle,
    pipeline and hold WebSockets, against an upstream that resets, stalls and trickles,
    then checks from outside (hashes, request ids, leaks, metrics, a prompt answer).

    60 s a pairing by default (CI runs `-- --seconds 10`). It prints its seed; a
    failure replays with `nox -s chaos -- --seed N --pairing asgi-uvicorn --seconds 60`.
    `-- --help` lists the rest (scenario filters, extra proxy flags, `--pool-pressure`).
    Another Python: `nox -s chaos --force-python 3.12 -- --pool-pressure`.
    """
    session.install("-e", ".[dev]")
    session.run("python", "-m", "tests.chaos", *session.posargs)


# The cache's score on the HTTP cache conformance suite (tests/cache-tests): both faces
# reach 155/160 and 91/105 today (the goal: 150 and 80); the floor sits a few
# tests below, for the suite's timing-dependent tests on a loaded machine. Raise it with it.
CACHE_REQUIRED, CACHE_OPTIMAL = 153, 89


@nox.session(python=PYTHON)
def cache_conformance(session: nox.Session) -> None:
    """The HTTP cache conformance suite (cache-tests.fyi's, vendored in tests/cache-tests)
    through `dualproxy serve --cache` on asgi-uvicorn and wsgi-gunicorn: prints the
    required/optimal score of each, fails under CACHE_REQUIRED/CACHE_OPTIMAL. Needs node.
    `-- --pairings asgi-uvicorn` for one; results JSON in the session's tmp folder."""
    session.install("-e", ".[dev]")
    session.run("python", "tests/cache_conformance.py", "--required", str(CACHE_REQUIRED),
                "--optimal", str(CACHE_OPTIMAL), "--out", session.create_tmp(),
                *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """A long differential fuzz of the HTTP/1.1 response parser against h11 and
    llhttp (not in CI; the suite runs a short fixed sample).

    `nox -s fuzz -- 200000` for another example count (the default, 60000, takes
    about ten minutes on two cores). Prints hypothesis' statistics.
    """
    session.install("-e", ".[dev]")
    examples = session.posargs[0] if session.posargs else "60000"
    session.run("pytest", "tests/test_http1_fuzz.py", "-q", "-p", "no:cacheprovider",
                "--hypothesis-show-statistics", env={"DUALPROXY_FUZZ_EXAMPLES": examples})
