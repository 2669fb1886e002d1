"""``vlsparse export``: a ticket and trained weights on disk -> a self-contained bundle directory.

Reads the ticket (:class:`~vlsparse.pruning.ticket.Ticket`), the weights (a safetensors state_dict:
``train-ticket``'s weights.safetensors or θ0) and the task's ``task.json``, rebuilds the model, and writes
a CSR or ONNX bundle with :mod:`vlsparse.export.exporters` (see :mod:`vlsparse.runtime.bundle` for the files).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from vlsparse.export.autotune import Timer, autotune
from vlsparse.export.exporters import export_csr, export_onnx, model_from_weights
from vlsparse.models.registry import load_tokenizer
from vlsparse.pruning.ticket import Ticket
from vlsparse.runtime.bundle import BundleExtras, find_task_info, ticket_metadata
from vlsparse.runtime.load import ExportError

FORMATS = ("csr", "onnx")


def _read_task_info(task_info: Path | None, weights: Path) -> dict:
    """task.json as a dict: ``task_info``, else the one beside ``weights`` or one level up.

    Raises:
        FileNotFoundError: no such file; ExportError: not JSON.
    """
    task_info = task_info or find_task_info(weights)
    if task_info is None:
        raise FileNotFoundError(f"no task.json beside --weights {weights} nor one level up; pass --task-info RUN/task.json")
    if not task_info.is_file():
        raise FileNotFoundError(f"--task-info {task_info}: file not found")
    try:
        return json.loads(task_info.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{task_info}: unreadable task info ({exc})") from None


def export_bundle(ticket: str | Path, weights: str | Path, model: str, out: str | Path, format: str = "csr",
                  sparse: bool = False, dtype: str = "fp32", layout: str = "auto", min_sparsity: float = 0.5,
                  task_info: str | Path | None = None, autotune_tokens: Sequence[int] | None = None,
                  timer: Timer | None = None) -> Ticket:
    """Export ``ticket``'s mask applied to ``weights`` as a bundle in ``out``; returns the ticket.

    Args:
        ticket, weights: the ticket file and the trained state_dict (safetensors).
        model: the model name or path the weights belong to (as ``--model``).
        out: the bundle directory; must not exist.
        format: "csr" (PyTorch + our SpMM kernels) or "onnx"; ``sparse``: ONNX with the custom op.
        dtype, layout: CSR values dtype ("fp32" | "fp16" | "bf16" | "int8") and layout ("auto" | "csr" | "bitmask");
            ONNX ``sparse``: "fp32" or "int8" (vlsparse.SparseLinearInt8 nodes, the csr int8 quantisation).
        min_sparsity: ONNX ``sparse``: convert the Linears with at least this fraction of zeros.
        task_info: task.json; default: the one beside ``weights`` or one level up.
        autotune_tokens: time each pruned Linear dense and CSR at these token counts on this machine and keep
            the faster per layer (:func:`vlsparse.export.autotune.autotune`; csr and onnx --sparse), recorded
            in the bundle's autotune.json; ``timer``: its timing function (tests).

    Raises:
        ValueError: bad ``format`` / ``sparse`` combination; ExportError (a ValueError): ``out`` exists or an
        unreadable file; FileNotFoundError: a missing file; TicketError, RunError: as their loaders.
    """
    ticket, weights, out = Path(ticket), Path(weights), Path(out)
    if format not in FORMATS:
        raise ValueError(f"--format must be csr or onnx, got {format!r}")
    if sparse and format != "onnx":
        raise ValueError("--sparse applies to --format onnx only (csr is sparse already)")
    if dtype != "fp32" and format != "csr" and not (dtype == "int8" and sparse):
        raise ValueError(f"--dtype {dtype} applies to --format csr (fp32, fp16, bf16, int8) and to --format onnx "
                         f"--sparse (fp32, int8); dense ONNX exports are fp32")
    if out.exists():
        raise ExportError(f"{out}: exists; refusing to overwrite an export (choose another --out)")
    if autotune_tokens is not None and format == "onnx" and not sparse:
        raise ValueError("--autotune applies to --format csr and to --format onnx --sparse")
    if autotune_tokens is not None and dtype != "fp32":
        raise ValueError(f"--autotune times the fp32 kernels; it does not apply to --dtype {dtype}")
    t = Ticket.load(ticket)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights file not found")
    info = _read_task_info(None if task_info is None else Path(task_info), weights)
    net = model_from_weights(model, weights, info.get("objective"))
    extras = BundleExtras(task_info=info, tokenizer=load_tokenizer(model),
                          ticket=ticket_metadata(t.meta, t.sparsity, weights))
    tuned = None
    if autotune_tokens is not None:
        tuned = autotune(net, t.mask, autotune_tokens, timer=timer)
    if format == "csr":
        export_csr(net, t.mask, out, dtype=dtype, layout=layout, bundle_extras=extras, tuned=tuned)
    else:
        export_onnx(net, t.mask, out, sparse=sparse, min_sparsity=min_sparsity, bundle_extras=extras, tuned=tuned,
                    dtype=dtype)
    return t
