"""gunicorn's threaded worker, starting dualproxy's drain clock when it is told to stop.

gunicorn's SIGTERM to a worker (a stop, a HUP reload, a scale-down) only ends
its accept loop; the threads serving requests go on until the arbiter's
graceful timeout kills the process, unlogged. With the clock started here,
the proxy itself ends what is left at `--graceful-timeout` (drain.py), logs
it, and the worker exits before the kill.
"""

from __future__ import annotations

from types import FrameType

from gunicorn.workers.gthread import ThreadWorker as _StockWorker

from ..drain import DRAIN


class ThreadWorker(_StockWorker):  # type: ignore[misc]
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        DRAIN.begin()
        super().handle_exit(sig, frame)

    def handle_quit(self, sig: int, frame: FrameType | None) -> None:
        """gunicorn's quick stop (a second SIGINT): end what is left now, logged."""
        DRAIN.end_now()
        super().handle_quit(sig, frame)
