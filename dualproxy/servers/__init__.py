"""Everything that knows gunicorn's, uvicorn's or granian's internals or settings.

The faces and the core run on any ASGI or WSGI server; what is here is what
`dualproxy serve` sets up and the speed-ups that lean on one server's private
internals. Each such speed-up runs only on the versions the suite tests
(`TESTED`, the same ranges as the `servers` extra in pyproject.toml) and
otherwise falls back to the portable path.
"""

from __future__ import annotations

import functools
import re
from importlib import metadata

# The JSON options `dualproxy serve` leaves its worker processes (uvicorn's app
# factory rebuilds the app from them; the uvicorn worker class reads its settings).
ENV_OPTIONS = "DUALPROXY_SERVE_OPTIONS"

# The scope key under which dualproxy's uvicorn protocol (uvicorn_protocols.py) hands
# the app a list it fills with callables; they run once, the moment the client is
# found gone before the response is complete. The ASGI face then needs no task
# watching receive() for a bodiless request (it makes one where the key is absent).
ON_GONE = "dualproxy.on_gone"

# A key of an `http.response.start` message: true when the app's next send is the
# body's first message, with nothing awaited before it (an empty body message when it
# must wait first). dualproxy's uvicorn protocol then holds the head for that message
# (one write for both) without a loop callback to send the head alone.
BODY_FOLLOWS = "dualproxy.body_follows"

# Distribution -> (lowest tested version, first untested version).
TESTED: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "gunicorn": ((27, 0), (28, 0)),
    "uvicorn": ((0, 54), (0, 55)),
    "granian": ((2, 8), (2, 9)),
}


@functools.cache
def installed_version(dist: str) -> tuple[int, ...] | None:
    """The installed release of `dist` as numbers (`27.0.1` -> (27, 0, 1)), or None."""
    try:
        text = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    match = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in match[0].split(".")) if match else None


def is_tested(dist: str) -> bool:
    """True when the installed `dist` is in the range the suite tests its internals on."""
    version = installed_version(dist)
    low, high = TESTED[dist]
    return version is not None and low <= version < high
