"""The models a bench measures: a run's levels (:class:`Level`), each as a masked model and its exported formats."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from torch import nn

from vlsparse.atomic import save_weights
from vlsparse.bench import BenchError
from vlsparse.export.exporters import export_csr, export_onnx, masked_copy, model_from_weights, save_onnx
from vlsparse.export.onnx_sparse import sparsify_onnx
from vlsparse.lottery.runs import Run
from vlsparse.pruning.ticket import Ticket
from vlsparse.runtime.bundle import ONNX_FILE
from vlsparse.runtime.quantize import quantize_onnx

__all__ = ["ONNX_MIN_SPARSITY", "Level", "find_levels", "masked_model", "export_formats", "format_key", "INT8_EXPORTS"]

ONNX_MIN_SPARSITY = 0.5  # onnx-sparse converts Linears with at least this fraction of zeros (export default)


@dataclass(frozen=True)
class Level:
    """One model to benchmark: a level of the IMP run or of the random-pruning baseline.

    ``weights``: the trained subnetwork when ``trained``, else θ0 (the mask is applied on load).
    ``metrics``: the level's metrics.json (empty when there is none).
    """

    method: str
    level: int
    ticket: Path
    weights: Path
    trained: bool
    metrics: dict = field(default_factory=dict, compare=False, hash=False)


def _run_levels(method: str, run: Run, theta0: Path, levels: Sequence[int] | None) -> list[Level]:
    """The levels of ``run`` that have a ticket (ascending), built from their weights or else ``theta0``."""
    found = []
    for k in dict.fromkeys(run.levels()):
        if not run.ticket(k).is_file() or (levels is not None and k not in levels):
            continue
        trained = run.weights(k).is_file()
        if not trained and not theta0.is_file():
            raise BenchError(f"{run.level(k)}: has neither weights.safetensors nor {theta0} to build the model from")
        found.append(Level(method, k, run.ticket(k), run.weights(k) if trained else theta0, trained,
                           run.metrics(k) if run.finished(k) else {}))
    return found


def find_levels(run: str | Path, levels: Sequence[int] | None = None) -> tuple[dict, list[Level]]:
    """The run's configuration ({"model", "task", ...}) and its levels, IMP first, then random pruning.

    ``run``: a ``find-ticket`` run directory (RUN/level_XX), its main-job parent OUT (OUT/imp and
    OUT/random) or OUT/imp. ``levels``: keep only these level numbers. The random-pruning levels
    without trained weights are built from the IMP run's θ0.

    Raises:
        FileNotFoundError: ``run`` is not a directory.
        BenchError: no level with a ticket, a level without weights nor θ0, or no model/task recorded.
    """
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"--run {run}: directory not found")
    imp = Run(run / "imp" if (run / "imp").is_dir() else run)
    rand = Run(imp.path.parent / "random" if imp.path.name == "imp" else imp.path / "random")
    found = _run_levels("imp", imp, imp.theta0, levels) + _run_levels("random", rand, imp.theta0, levels)
    if not found:
        which = "" if levels is None else f" among --levels {','.join(map(str, levels))}"
        raise BenchError(f"--run {run}: no levels to benchmark{which} (expected RUN/level_XX/ticket.safetensors "
                         "from find-ticket, or OUT/imp/level_XX from main-job)")
    cfg = json.loads(imp.config.read_text()) if imp.config.is_file() else {}
    if not cfg.get("model") or not cfg.get("task"):
        meta = Ticket.load(found[0].ticket).meta
        cfg = {**cfg, "model": cfg.get("model") or meta.get("model"), "task": cfg.get("task") or meta.get("task")}
    if not cfg.get("model"):
        raise BenchError(f"{imp.path}: no config.json and the tickets do not name their model")
    return cfg, found


def masked_model(model_name: str, level: Level) -> tuple[nn.Module, dict]:
    """The level's model (eval mode, fp32, CPU) with its weights loaded and the mask applied; and the mask
    (parameter name -> bool tensor of the weight's shape, True = kept).

    Raises:
        ValueError (RunError, CheckpointError, TicketError, ExportError): weights or ticket that do not fit.
    """
    mask = Ticket.load(level.ticket).mask
    return masked_copy(model_from_weights(model_name, level.weights), mask, str(level.ticket)), mask


#: the formats whose int8 model is an export of its own (dense int8 is quantised at load from the dense files)
INT8_EXPORTS = ("csr", "onnx", "onnx-sparse")


def format_key(fmt: str, dtype: str) -> str:
    """The key in :func:`export_formats`'s result (and directory name) of the files ``fmt`` runs in ``dtype``:
    "csr-int8", "onnx-int8" and "onnx-sparse-int8" for the int8 exports, else ``fmt`` (fp16 and dense int8 convert
    at load)."""
    return f"{fmt}-int8" if dtype == "int8" and fmt in INT8_EXPORTS else fmt


def export_formats(model: nn.Module, mask: dict, formats: Sequence[str], workdir: str | Path,
                   dtypes: Sequence[str] = ("fp32",)) -> dict[str, Path]:
    """Write ``formats`` of the masked ``model`` under ``workdir`` (one directory each); return
    :func:`format_key` -> dir.

    "dense" (config.json + model.safetensors of the masked state) is always written: it is the
    reference. "onnx-sparse" is made from the "onnx" export by vlsparse.export.onnx_sparse.sparsify_onnx
    (min_sparsity = :data:`ONNX_MIN_SPARSITY`), so "onnx" is written with it. With "int8" in ``dtypes``:
    "csr-int8" (``export_csr(dtype="int8")``: the pruned Linears as per-channel int8, loaded as
    Int8SparseLinear; 1x4 blocks where the ticket has them) when "csr" is in ``formats``, and "onnx-int8"
    (the "onnx" export through :func:`vlsparse.runtime.quantize.quantize_onnx`) when "onnx" is, and
    "onnx-sparse-int8" (``sparsify_onnx(dtype="int8")``: vlsparse.SparseLinearInt8 nodes) when "onnx-sparse" is.
    """
    work = Path(workdir)
    paths = {"dense": work / "dense"}
    paths["dense"].mkdir(parents=True)
    (paths["dense"] / "config.json").write_text(model.config.to_json_string(use_diff=False))
    save_weights(paths["dense"] / "model.safetensors", model)
    if "csr" in formats:
        paths["csr"] = export_csr(model, mask, work / "csr")
    if "onnx" in formats or "onnx-sparse" in formats:
        paths["onnx"] = export_onnx(model, mask, work / "onnx")
    if "onnx-sparse" in formats:
        dense_onnx = onnx.load(str(paths["onnx"] / ONNX_FILE))  # loaded once; sparsify_onnx returns a copy
        for dtype in ("fp32", "int8") if "int8" in dtypes else ("fp32",):
            proto = sparsify_onnx(dense_onnx, min_sparsity=ONNX_MIN_SPARSITY, dtype=dtype)
            d = paths[format_key("onnx-sparse", dtype)] = work / format_key("onnx-sparse", dtype)
            d.mkdir()
            save_onnx(proto, d)
            (d / "config.json").write_text((paths["onnx"] / "config.json").read_text())
    if "int8" in dtypes and "csr" in formats:
        paths["csr-int8"] = export_csr(model, mask, work / "csr-int8", dtype="int8")
    if "int8" in dtypes and "onnx" in formats:
        paths["onnx-int8"] = quantize_onnx(paths["onnx"], work / "onnx-int8")
    return paths
