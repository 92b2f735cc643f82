# dualproxy in a container. Build and run (the upstream is the only required flag):
#   docker build -t dualproxy .
#   docker run --rm -p 8000:8000 -p 9100:9100 dualproxy --upstream http://app:9000
# Flags after the image name are appended to the entry point's: a second --bind or
# --metrics-bind replaces the one below (argparse keeps the last).
#
# Stopping: `docker stop` sends STOPSIGNAL (SIGTERM), dualproxy drains in-flight requests
# for up to --graceful-timeout (default 30 s), then Docker SIGKILLs after its own stop
# timeout (default 10 s). Keep Docker's longer: `docker stop -t 40`, or
# `docker run --stop-timeout 40`, or lower --graceful-timeout below it.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin dualproxy

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY dualproxy ./dualproxy
# The package itself from this tree: its dependencies' ranges are pinned in pyproject.toml.
# `tracing`: OpenTelemetry's API, SDK and OTLP/HTTP exporter, so `--tracing` works in the
# image (configured by the OTEL_* variables, `docker run -e OTEL_EXPORTER_OTLP_ENDPOINT=...`).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[servers,metrics,tracing]"

WORKDIR /
USER 10001:10001
EXPOSE 8000 9100
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["dualproxy", "serve", "--bind", "0.0.0.0:8000", "--metrics-bind", "0.0.0.0:9100"]
