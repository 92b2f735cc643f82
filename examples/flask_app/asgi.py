"""The legacy Flask app served by an ASGI server (uvicorn) through a2wsgi.

dualproxy's WSGIBridge is a2wsgi plus the two signals a2wsgi drops: a client
that disconnects mid-upload, and one that leaves mid-download.

    DUALPROXY_UPSTREAM=http://127.0.0.1:9000 \\
        uvicorn examples.flask_app.asgi:app --no-proxy-headers
"""

from __future__ import annotations

from dualproxy.bridge import WSGIBridge
from examples.flask_app.app import app as flask_app

app = WSGIBridge(flask_app, threads=32)  # type: ignore[arg-type]
