"""Small apps for the integration tests: the mount and middleware forms.

The upstream comes from DUALPROXY_UPSTREAM, as in the examples.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from flask import Flask

from dualproxy import AsyncProxy
from dualproxy.fastapi import proxy_lifespan
from dualproxy.flask import wrap_wsgi_app

UPSTREAM = os.environ.get("DUALPROXY_UPSTREAM", "http://127.0.0.1:9")

# FastAPI, mount form: Starlette sets root_path=/mnt and keeps the full path.
mounted_proxy = AsyncProxy(UPSTREAM + "/base")
fastapi_mount = FastAPI(lifespan=proxy_lifespan(mounted_proxy))
fastapi_mount.mount("/mnt", mounted_proxy)


@fastapi_mount.get("/own")
async def own() -> dict[str, str]:
    return {"served_by": "fastapi"}


# Flask, WSGI-middleware form: /files is proxied, everything else reaches Flask.
flask_middleware = Flask(__name__)


@flask_middleware.get("/own")
def flask_own() -> str:
    return "served by flask"


wrap_wsgi_app(flask_middleware, UPSTREAM, "/files")
