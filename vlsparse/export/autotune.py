"""``vlsparse export --autotune``: per pruned Linear, the fastest format on the exporting machine.

For every weight of the mask, W = weight * mask (out, in) and its bias are timed as

* ``dense``: ``F.linear`` over the masked dense weight (MKL on the CPU), and
* ``csr``: :class:`~vlsparse.sparse.linear.SparseLinear` on our CPU kernel (a bitmask-stored weight is
  decoded to CSR at load and runs this same kernel, so it is not timed apart),

at each token count T of ``tokens`` (random (T, in) float32 inputs), the two formats called in turn
(:func:`vlsparse.sparse.timing.time_interleaved`, ``repeats`` rounds after 3 warm-up calls) and the
median kept. A layer stays sparse when its mean time ratio csr / dense over the token counts is below
1 (each token count weighs the same), else it is exported dense. The record (:func:`autotune`) goes into
the bundle as ``autotune.json`` (format ``vlsparse-autotune-1``; see :func:`vlsparse.runtime.load.check_autotune`)::

    {"format": ..., "tokens": [1, 40, 200], "repeats": 20, "threads": 2, "machine": "x86_64 ...",
     "layers": {"<weight name>": {"shape": [out, in], "sparsity": 0.7, "choice": "dense" | "csr" | "bitmask",
                                  "median_ms": {"dense": {"1": 0.05, ...}, "csr": {"1": 0.03, ...}}}}}

``choice`` is the stored layout of a sparse layer (``--layout``), or ``dense``. The timing function can be
injected (``timer``) so that tests decide the outcome without timing anything.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vlsparse.pruning.mask import Mask
from vlsparse.runtime.checks import AUTOTUNE_FORMAT
from vlsparse.runtime.load import ExportError
from vlsparse.sparse.linear import SparseLinear
from vlsparse.sparse.timing import time_interleaved

__all__ = ["DEFAULT_TOKENS", "Timer", "autotune", "parse_tokens"]

DEFAULT_TOKENS = (1, 40, 200)
#: timer(layer name, tokens, {"dense": fn, "csr": fn}) -> {format: seconds of each timed call}
Timer = Callable[[str, int, dict[str, Callable[[], Any]]], dict[str, list[float]]]


def parse_tokens(text: str) -> tuple[int, ...]:
    """``"1,40,200"`` -> (1, 40, 200). Raises ValueError naming ``--tokens`` unless 1-16 integers in [1, 65536]."""
    try:
        tokens = tuple(int(t) for t in str(text).split(","))
    except ValueError:
        tokens = ()
    if not 1 <= len(tokens) <= 16 or not all(1 <= t <= 65536 for t in tokens):
        raise ValueError(f"--tokens must be 1-16 comma-separated token counts in [1, 65536], got {text!r}")
    return tokens


def _interleaved(repeats: int) -> Timer:
    return lambda name, tokens, fns: time_interleaved(fns, repeats)


def autotune(model: torch.nn.Module, mask: Mask, tokens: Sequence[int] = DEFAULT_TOKENS, repeats: int = 20,
             timer: Timer | None = None) -> dict:
    """Time each masked Linear of ``model`` (names: ``mask``'s weight names, bool (out, in) masks) as dense
    and as CSR at each token count; return the record of the module docstring, with ``choice`` "dense" or
    "csr" (the exporter replaces "csr" by the layout it stores). ``timer``: the timing function (default:
    interleaved calls, ``repeats`` rounds). Threads: torch's current setting.

    Raises:
        ExportError: ``repeats`` < 1, no token count, or a mask entry that is not a Linear weight.
    """
    if repeats < 1 or not tokens:
        raise ExportError(f"autotune needs repeats >= 1 and at least one token count (got {repeats}, {list(tokens)})")
    timer = timer or _interleaved(repeats)
    layers = {}
    with torch.inference_mode():
        for name, m in mask.items():
            layers[name] = _tune_layer(model, name, m, tokens, timer)
    return {"format": AUTOTUNE_FORMAT, "tokens": [int(t) for t in tokens], "repeats": int(repeats),
            "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "layers": layers}


def _tune_layer(model: torch.nn.Module, name: str, mask: torch.Tensor, tokens: Sequence[int], timer: Timer) -> dict:
    """One layer's entry: shape, sparsity, median ms per format and token count, the faster format."""
    module = model.get_submodule(name.removesuffix(".weight"))
    if not isinstance(module, torch.nn.Linear) or not name.endswith(".weight"):
        raise ExportError(f"autotune: {name} is not the weight of an nn.Linear")
    w = (module.weight.detach().float() * mask).contiguous()  # (out, in) fp32, pruned entries 0
    b = None if module.bias is None else module.bias.detach().float()
    sparse = SparseLinear.from_dense(module, mask, backend="cpu")
    gen = torch.Generator().manual_seed(0)
    ms: dict[str, dict[str, float]] = {"dense": {}, "csr": {}}
    for t in tokens:
        x = torch.randn(int(t), w.shape[1], generator=gen)  # (T, in) fp32
        fns = {"dense": lambda x=x: F.linear(x, w, b), "csr": lambda x=x: sparse(x)}
        try:
            times = timer(name, int(t), fns)
        except RuntimeError as exc:  # no C++ compiler, or the kernel's build failed
            raise ExportError(f"--autotune needs the CPU kernel: {str(exc)[:300]}") from None
        for fmt in ms:
            ms[fmt][str(int(t))] = 1e3 * statistics.median(times[fmt])
    ratio = statistics.mean(ms["csr"][k] / max(ms["dense"][k], 1e-9) for k in ms["dense"])
    return {"shape": list(w.shape), "sparsity": round(1.0 - float(mask.float().mean()), 6),
            "choice": "csr" if ratio < 1.0 else "dense", "median_ms": ms}
