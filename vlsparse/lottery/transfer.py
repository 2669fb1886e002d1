"""Tickets across tasks (Gan et al. 2022, sec. 5, Fig. 3 and Table 2): each source's ticket trained on other tasks.

``vlsparse transfer --source RUN_OR_TICKET ... --target TASK ... --levels 0.5,0.7,0.8 --out DIR``: for every
(source, target, level) cell, the source's mask at that sparsity is trained on the target task from θ0: the
model's pre-trained weights with **the target task's own freshly initialised head φ0** (the head
:func:`vlsparse.lottery.setup.setup` builds for the target with ``--seed``; the source task's head is never
used), with the training options of ``train-ticket``. Each target also gets a dense cell (all weights kept,
same θ0 and steps): the reference of "% of dense". Layout of DIR::

    DIR/config.json                                 model + training options (another one is refused)
    DIR/cells/<source>/<target>/s<percent>/metrics.json   one cell (written last: a cell is finished once it exists)
    DIR/cells/dense/<target>/s0/metrics.json        the target's dense reference
    DIR/transfer.csv, transfer.md, transfer_heatmap.png, transfer_<target>.png   (vlsparse.lottery.transfer_report)
    DIR/overlap.csv, overlap_heatmap.png            mask IoU of every pair of sources at every level

Re-running resumes cell by cell. A cell whose source is an IMP run *on the target task itself*, with the same
model and training options, is that run's level (an IMP level's metrics are those of training its mask from
θ0 with the same head φ0 and steps, ``tests/test_imp.py``): its metrics are copied with ``"from_run"`` set,
not recomputed; the dense cell likewise from such a run's level 0. "The same training options" are
:meth:`TrainConfig.identity` (also what config.json holds), which includes the adversarial settings: with
``--adversarial`` (VILLA's adversarial training, :mod:`vlsparse.training.adversarial`) every cell trains
adversarially, such a DIR is another configuration than a standard one (resuming one with the other is refused),
and only an IMP run with the same adversarial settings is copied. Every cell's metrics.json records ``training``
(standard | adversarial) and the settings (``adversarial``, JSON), as tickets do.

Under torchrun (``torchrun --nproc_per_node N -m vlsparse transfer ...``) every cell trains on all ranks
(:mod:`vlsparse.training.distributed`); rank 0 decides which cells are missing and writes every file.

Sources: an IMP run directory (``find-ticket --out RUN``: its levels' tickets, matched to ``--levels`` by their
target sparsity) or one ticket file (a single level, its target sparsity). Labels: the source's task
(``config.json`` or the ticket's metadata), with the directory or file name added when two sources share a task.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlsparse.atomic import locked, write_json
from vlsparse.data import TASKS
from vlsparse.lottery.retrain import retrain_ticket
from vlsparse.lottery.runs import CONFIG, Run, RunError
from vlsparse.lottery.setup import setup
from vlsparse.pruning.mask import check_mask_fits, ones_mask
from vlsparse.pruning.ticket import Ticket, TicketError
from vlsparse.training.adversarial_config import training_meta
from vlsparse.training.config import TrainConfig
from vlsparse.training.distributed import main_only

__all__ = ["Source", "TransferConfig", "parse_transfer_levels", "resolve_source", "run_transfer", "cell_dir",
           "ticket_at", "DENSE"]

#: the label of the dense reference cells
DENSE = "dense"
_TOLERANCE = 1e-4  # a ticket's target sparsity matches a level within this (fractions)


@dataclass
class Source:
    """A source of tickets: ``label``; the run directory or ticket file ``path``; its task and model (from
    config.json or the ticket's metadata; "" when unknown); ``tickets``: target sparsity (fraction) -> ticket file;
    ``run``: the run (None for a ticket file) and its configuration dict."""

    label: str
    path: Path
    task: str
    model: str
    tickets: dict[float, Path]
    run: Run | None = None
    config: dict = field(default_factory=dict)


@dataclass
class TransferConfig:
    """What must match to resume into a transfer DIR: the model and the training options (not the device)."""

    model: str
    train: TrainConfig

    def identity(self) -> dict:
        return {"model": self.model, "train": self.train.identity()}


def parse_transfer_levels(levels: str) -> list[float]:
    """"0.5,0.7,0.8" -> [0.5, 0.7, 0.8]: sparsities (fractions in (0, 1)), sorted, without repeats.

    Raises:
        ValueError: not comma-separated numbers, or one outside (0, 1).
    """
    try:
        out = sorted({float(x) for x in levels.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--levels must be comma-separated fractions like 0.5,0.7,0.8, got {levels!r}") from None
    if not out or any(not 0.0 < s < 1.0 for s in out):
        raise ValueError(f"--levels must be sparsities in (0, 1), got {levels!r}")
    return out


def _target_sparsity(ticket: Path) -> float:
    meta = Ticket.load(ticket).meta
    return float(meta.get("target_sparsity") or meta["sparsity"])


def resolve_source(path: str | Path) -> Source:
    """The :class:`Source` of an IMP run directory or a ticket file (label: its task; see the module docstring).

    Raises:
        FileNotFoundError: ``path`` is neither a run directory (with config.json) nor a file.
        TicketError / RunError: an unreadable ticket or config.json.
    """
    path = Path(path)
    if path.is_dir():
        run = Run(path)
        if not run.config.is_file():
            raise FileNotFoundError(f"--source {path}: not a run directory (no {CONFIG}) nor a ticket file")
        try:
            config = json.loads(run.config.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunError(f"{run.config}: unreadable run configuration ({exc})") from None
        tickets = {round(_target_sparsity(run.ticket(k)), 6): run.ticket(k)
                   for k in run.levels() if k > 0 and run.ticket(k).is_file()}
        return Source(str(config.get("task", path.name)), path, str(config.get("task", "")),
                      str(config.get("model", "")), tickets, run, config)
    if not path.is_file():
        raise FileNotFoundError(f"--source {path}: no such run directory or ticket file")
    meta = Ticket.load(path).meta
    task = meta.get("task", "")
    return Source(task or path.stem, path, task, meta.get("model", ""), {round(_target_sparsity(path), 6): path})


def _label_uniquely(sources: list[Source]) -> None:
    seen: dict[str, int] = {}
    for s in sources:
        seen[s.label] = seen.get(s.label, 0) + 1
    for s in sources:
        if seen[s.label] > 1:
            s.label = f"{s.label} ({s.path.name})"


def ticket_at(source: Source, level: float) -> Path:
    """The ticket file of ``source`` at sparsity ``level`` (a fraction; matched within 1e-4).

    Raises:
        ValueError: no such ticket (the message lists the levels the source has).
    """
    for s, ticket in source.tickets.items():
        if abs(s - level) <= _TOLERANCE:
            return ticket
    have = ", ".join(f"{s:.0%}" for s in sorted(source.tickets)) or "none"
    raise ValueError(f"--source {source.path} has no ticket at {level:.0%} sparsity (its levels: {have})")


def cell_dir(out: Path, label: str, target: str, level: float) -> Path:
    """DIR/cells/<label>/<target>/s<percent> (label and target with "/" and spaces made safe)."""
    safe = lambda x: x.replace("/", "_").replace(" ", "_")  # noqa: E731
    return Path(out) / "cells" / safe(label) / safe(target) / f"s{round(level * 100):d}"


def _check_config(out: Path, cfg: TransferConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG
    new = json.loads(json.dumps(cfg.identity()))
    if path.is_file():
        old = json.loads(path.read_text())
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise RunError(f"{out}: holds a transfer with another configuration (differs in {', '.join(diff)}); "
                           "use a new --out directory or the original settings")
    else:
        write_json(path, new)


def _from_run(source: Source, target: str, level: float, cfg: TransferConfig) -> dict | None:
    """The metrics of the source run's level at ``level`` (0: dense) when the run is the same training on
    ``target`` (same task, model, training options, no rewinding) and that level is finished; else None."""
    if source.run is None or source.task != target or source.config.get("model") != cfg.model:
        return None
    if source.config.get("train") != json.loads(json.dumps(cfg.identity()["train"])) or source.config.get("rewind_step", 0):
        return None
    for k in source.run.levels():
        if source.run.finished(k):
            m = source.run.metrics(k)
            if abs(m["target_sparsity"] - level) <= _TOLERANCE:
                return {**m, **training_meta(cfg.train.adversarial), "from_run": str(source.run.level(k))}
    return None


def _preflight(sources: list[Source], targets: Sequence[str], levels: list[float], model: str | None) -> str:
    """Check every name and ticket before training anything; returns the model name."""
    unknown = [t for t in targets if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown --target {unknown[0]!r}; known tasks: {', '.join(sorted(TASKS))}")
    for s in sources:
        for level in levels:
            ticket_at(s, level)
    models = {s.model for s in sources if s.model}
    if model is None:
        if len(models) != 1:
            raise ValueError(f"the sources come from {len(models)} models ({', '.join(sorted(models)) or 'unknown'}): "
                             "give --model")
        model = models.pop()
    for s in sources:
        if s.model and s.model != model:
            raise TicketError(f"--source {s.path}: tickets of model {s.model!r}, not of --model {model!r}")
    return model


def _check_masks_fit(sources: list[Source], levels: list[float], net) -> None:
    for s in sources:
        for level in levels:
            ticket = ticket_at(s, level)
            try:
                check_mask_fits(Ticket.load(ticket).mask, net, str(ticket))
            except ValueError as exc:
                raise TicketError(f"{exc} (a different model or prune scope than the target model)") from None


@locked("out")
def run_transfer(out: str | Path, sources: Sequence[str | Path], targets: Sequence[str], levels: Sequence[float],
                 train: TrainConfig, model: str | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> tuple[list[dict], list[Source]]:
    """Train every (source, target, level) cell not yet in ``out`` (module docstring); returns (every cell's
    record: source, target, level (fraction), sparsity (actual), val/test metrics (fractions), from_run, the cell
    directory; the sources). Plots and tables: :func:`vlsparse.lottery.transfer_report.write_reports`.

    Everything is checked before the first cell trains; an error later leaves the finished cells in place. The
    command holds ``out``'s run lock (:func:`vlsparse.atomic.run_lock`) from start to end.

    Raises:
        ValueError: an unknown target, a source without a ticket at a level (naming the levels it has),
            sources of several models without ``model``.
        TicketError: a ticket of another model or prune scope than ``model``.
        RunError: ``out`` holds a transfer with another model or training options; unreadable sources.
        FileNotFoundError: a source that is neither a run directory nor a ticket file.
        RunLockedError: another process holds ``out``.
    """
    out = Path(out)
    srcs = [resolve_source(p) for p in sources]
    _label_uniquely(srcs)
    model = _preflight(srcs, targets, list(levels), model)
    cfg = TransferConfig(model, train)
    main_only(lambda: _check_config(out, cfg))
    records = []
    for target in targets:
        records += _target_cells(out, srcs, target, list(levels), cfg, progress)
    return records, srcs


def _target_cells(out: Path, srcs: list[Source], target: str, levels: list[float], cfg: TransferConfig,
                  progress: Callable[[str, int, int], None] | None) -> list[dict]:
    """The cells of one target: the dense reference, then every (source, level); trains the missing ones (those
    that an IMP run on the target may still finish, last: each is looked up again just before it would train).
    Under torchrun rank 0 decides which cells are missing and writes them (:mod:`vlsparse.training.distributed`);
    every rank trains its share of each."""
    dense = Source(DENSE, Path(DENSE), "", cfg.model, {})
    cells = [(dense, 0.0)] + [(s, level) for s in srcs for level in levels]

    def reuse(i: int) -> bool:  # rank 0: copy the cell from an IMP run on the target, if there is one
        source, level = cells[i]
        found = next((m for s in srcs if (m := _from_run(s, target, level, cfg)) is not None), None) \
            if source is dense else _from_run(source, target, level, cfg)
        if found is not None:
            write_json(cell_dir(out, source.label, target, level) / "metrics.json", found)
        return found is not None

    def missing() -> list[int]:  # rank 0: the cells neither on disk nor copied, own-task ones last
        todo = [i for i, (s, lv) in enumerate(cells)
                if not (cell_dir(out, s.label, target, lv) / "metrics.json").is_file() and not reuse(i)]
        return sorted(todo, key=lambda i: cells[i][0].task == target or i == 0)  # own-task runs may finish meanwhile

    todo = main_only(missing)
    if todo:
        net, data, collate = setup(cfg.model, target, cfg.train.seed)  # θ0: pre-trained + the target's head φ0
        _check_masks_fit(srcs, levels, net)
        theta0 = {k: v.detach().clone() for k, v in net.state_dict().items()}
        for i in todo:
            if main_only(lambda i=i: reuse(i)):
                continue
            source, level = cells[i]
            net.load_state_dict(theta0)
            ticket = Ticket(ones_mask(net, net.prune_scope()), {"method": "dense"}) if source is dense \
                else Ticket.load(ticket_at(source, level))
            desc = f"{source.label} -> {target} {level:.0%}"
            retrain_ticket(ticket, net, data, collate, cfg.train, cell_dir(out, source.label, target, level),
                           ticket_path=str(source.path), save=False,
                           progress=(lambda s, desc=desc: progress(desc, s, cfg.train.steps)) if progress else None)
    return main_only(lambda: [_record(source, target, level, cell_dir(out, source.label, target, level))
                              for source, level in cells])


def _record(source: Source, target: str, level: float, d: Path) -> dict:
    m = json.loads((d / "metrics.json").read_text())
    return {"source": source.label, "target": target, "level": level, "sparsity": m["sparsity"],
            "val": m["val"], "test": m["test"], "from_run": m.get("from_run", ""),
            "training": m.get("training", "standard"), "cell": str(d)}
