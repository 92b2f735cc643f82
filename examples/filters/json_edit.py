"""Edit whole JSON documents on their way to the client: `Buffered` collects a body up to
its limit, then hands it to the edit; a larger body passes through untouched.

    DUALPROXY_UPSTREAM=http://127.0.0.1:9000 \\
        gunicorn -k gthread --threads 32 examples.filters.json_edit:app
"""

from __future__ import annotations

import json
import os

from dualproxy import SyncProxy
from dualproxy.filters import Buffered

UPSTREAM = os.environ.get("DUALPROXY_UPSTREAM", "http://127.0.0.1:9000")


def drop_internal_fields(document: bytes) -> bytes:
    """Remove the `_internal` fields of a JSON object; anything else goes on as it came."""
    try:
        data = json.loads(document)
    except ValueError:
        return document  # not JSON after all: leave it (raising would abort the response)
    if isinstance(data, dict):
        data = {key: value for key, value in data.items() if not key.startswith("_")}
    return json.dumps(data).encode()


app = SyncProxy(UPSTREAM, filters=[
    Buffered(drop_internal_fields, limit=1 << 20, types="application/json", decode=True),
])
