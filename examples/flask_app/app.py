"""A small legacy Flask app with an upload area proxied to a storage service.

Pages, a form and a login live in Flask as they always did; everything under
`/upload/` is streamed to the service at DUALPROXY_UPSTREAM by dualproxy, after
Flask's own `before_request` auth check; `/metrics` shows the proxy's Prometheus
metrics among the process's own. Run it with gunicorn:

    DUALPROXY_UPSTREAM=http://127.0.0.1:9000 \\
        gunicorn -c examples/flask_app/gunicorn.conf.py examples.flask_app.app:app
"""

from __future__ import annotations

import os

from flask import Flask, Response, redirect, render_template_string, request, session, url_for
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from werkzeug.wrappers.response import Response as BaseResponse

from dualproxy.flask import FlaskProxy

UPSTREAM = os.environ.get("DUALPROXY_UPSTREAM", "http://127.0.0.1:9000")
TOKEN = os.environ.get("EXAMPLE_TOKEN", "secret-token")

app = Flask(__name__)
app.secret_key = os.environ.get("EXAMPLE_SECRET_KEY", "change-me")

# The upload area: streamed both ways to the storage service, never buffered by Flask;
# counted in the `dualproxy_*` metrics of prometheus_client's default registry.
storage = FlaskProxy(upstream=UPSTREAM, prefix="/upload", metrics=True)
storage.init_app(app)

PAGE = """<!doctype html><title>{{ title }}</title>
<h1>{{ title }}</h1>
<p>{{ body }}</p>
<nav><a href="{{ url_for('index') }}">home</a> <a href="{{ url_for('about') }}">about</a>
<a href="{{ url_for('contact') }}">contact</a> <a href="{{ url_for('login') }}">login</a></nav>"""
# url_for, not "/about": mounted under a prefix (the FastAPI example's /legacy, a2wsgi's
# SCRIPT_NAME) the links stay inside it.


@app.before_request
def require_login_for_uploads() -> Response | None:
    """Uploads need a logged-in session or the bearer token; Flask decides, not the proxy."""
    if request.blueprint != storage.name:  # only the proxied area is guarded here
        return None
    if session.get("user") or request.headers.get("Authorization") == f"Bearer {TOKEN}":
        return None
    return Response("login required\n", status=401, mimetype="text/plain")


@app.get("/")
def index() -> str:
    user = session.get("user", "guest")
    return render_template_string(PAGE, title="Legacy app", body=f"Hello, {user}.")


@app.get("/about")
def about() -> str:
    return render_template_string(PAGE, title="About", body="Uploads live under /upload/.")


@app.route("/contact", methods=["GET", "POST"])
def contact() -> str:
    if request.method == "POST":
        session["last_message"] = request.form.get("message", "")
        return render_template_string(PAGE, title="Thanks", body="Message received.")
    return render_template_string(
        PAGE + '<form method="post"><input name="message"><button>send</button></form>',
        title="Contact", body=session.get("last_message", ""))


@app.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse | str:
    if request.method == "POST":
        session["user"] = request.form.get("user") or "anonymous"
        return redirect(url_for("index"))
    return render_template_string(
        PAGE + '<form method="post"><input name="user"><button>login</button></form>',
        title="Login", body="")


@app.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics. With several gunicorn workers, PROMETHEUS_MULTIPROC_DIR (an
    empty directory, set before gunicorn starts) lets any worker answer for all of them."""
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
