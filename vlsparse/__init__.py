"""vlsparse: find lottery tickets in vision-and-language transformers and ship them as sparse models.

Implements "Playing Lottery Tickets with Vision and Language" (Gan et al., AAAI 2022).

The public API (imported on first use, so that ``import vlsparse`` stays cheap and the ONNX runtime
path needs no torch):

- :class:`Pipeline` (vlsparse.runtime.pipeline): answer questions with an exported bundle;
- :func:`load_sparse` (vlsparse.runtime.load): a CSR export as a PyTorch model (needs torch);
- :class:`SparseLinear` (vlsparse.sparse.linear): a Linear layer in CSR form on our SpMM kernels (torch);
- :class:`Ticket` (vlsparse.pruning.ticket): a mask with its metadata (torch);
- :func:`ort_session` (vlsparse.runtime.ort): onnxruntime with our sparse custom op registered.
"""

from __future__ import annotations

import importlib

from vlsparse._version import __version__

_LAZY = {
    "Pipeline": "vlsparse.runtime.pipeline",
    "load_sparse": "vlsparse.runtime.load",
    "SparseLinear": "vlsparse.sparse.linear",
    "Ticket": "vlsparse.pruning.ticket",
    "ort_session": "vlsparse.runtime.ort",
}

__all__ = ["Pipeline", "load_sparse", "SparseLinear", "Ticket", "ort_session", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
