"""Kept so `gunicorn -k dualproxy.workers.UvicornWorker` goes on working; see servers.worker."""

from __future__ import annotations

from .servers.worker import UvicornWorker

__all__ = ["UvicornWorker"]
