"""Run the app under uvicorn with a graceful shutdown: :func:`main` (what ``vlsparse serve`` calls).

Sets OMP_WAIT_POLICY=PASSIVE unless it is set. On SIGTERM (or Ctrl+C) the server stops accepting connections, runs every request already queued at once
(no more waiting for fuller batches), answers them, then exits with status 0. Requests still running after
``timeout_s + 5`` seconds are cancelled.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

import uvicorn

from vlsparse.runtime.pipeline import Pipeline
from vlsparse.serve.app import create_app
from vlsparse.serve.settings import Settings

__all__ = ["main", "run"]


class _Server(uvicorn.Server):
    """uvicorn's server, telling the batcher to drain as soon as an exit signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._on_exit()


def _ignore(signum, frame) -> None:
    """SIGTERM after the graceful shutdown: uvicorn re-raises the signal it handled; exit 0 instead of dying."""


def run(app, settings: Settings, log_level: str = "info") -> None:
    """Serve an app of :func:`~vlsparse.serve.app.create_app` on ``settings.host:settings.port`` until SIGTERM /
    SIGINT, then drain and return.

    Raises:
        SystemExit: (from uvicorn, status 1) when the address cannot be bound, e.g. the port is in use.
    """
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(settings.timeout_s) + 5, access_log=False)
    server = _Server(config, app.state.batcher.drain_soon)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _ignore) if main_thread else None
    try:
        server.run()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def main(bundle: str | os.PathLike, settings: Optional[Settings] = None) -> None:
    """Load the bundle, build the app, serve it (``vlsparse serve --model BUNDLE``); returns after a shutdown.

    Args:
        bundle: a bundle directory written by ``vlsparse export`` (onnx bundles need no torch).
        settings: the server options (default :class:`Settings`()).

    Raises:
        FileNotFoundError, BundleError (a ValueError): as :meth:`Pipeline.load`.
        SystemExit: the address cannot be bound (uvicorn exits with status 1).
    """
    settings = settings or Settings()
    # between requests the OpenMP threads of our sparse op sleep instead of spin-waiting (read when the op
    # library loads, below): a server idles between batches, and shares its machine
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.perf_counter()
    pipeline = Pipeline.load(bundle, threads=settings.threads, batch_size=settings.max_batch)
    app = create_app(pipeline, settings)
    info = app.state.info
    sparsity = "?" if info["sparsity"] is None else f"{100 * float(info['sparsity']):.0f}%"
    print(f"vlsparse serve: {info['format']} bundle {bundle} (model {info['model']}, sparsity {sparsity}, "
          f"id {info['id'][:12]}), loaded in {(time.perf_counter() - t0) * 1e3:.0f} ms; "
          f"http://{settings.host}:{settings.port}/", file=sys.stderr, flush=True)
    run(app, settings)
