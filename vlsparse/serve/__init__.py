"""``vlsparse serve``: an HTTP server for a bundle, with dynamic batching (FastAPI on uvicorn).

- :class:`Settings` (settings): the options and their defaults;
- :class:`~vlsparse.serve.batching.Batcher` (batching): groups concurrent requests into batches, no HTTP;
- :func:`create_app` (app): the ASGI app around a loaded :class:`vlsparse.Pipeline`;
- :func:`main` (server): load a bundle and serve it under uvicorn, draining on SIGTERM.

Imports the runtime only (no torch, no export code): ONNX bundles are served by the torch-free install
plus the ``serve`` extra.
"""

from vlsparse.serve.app import create_app
from vlsparse.serve.server import main, run
from vlsparse.serve.settings import Settings

__all__ = ["Settings", "create_app", "main", "run"]
