"""Standard vs adversarial lottery tickets (Gan et al. 2022, Q7 / Fig. 5) on easy-VQA: README "Adversarial tickets".

    python benchmarks/adversarial_tickets.py --out runs/adv-tickets --steps 500 --levels 0.5,0.7,0.8 --seed 0 \
        [--eval-questions 2000]

1. ``OUT/standard``: IMP with plain training (as ``vlsparse find-ticket``, but ``--eval-questions N`` cuts val
   and test to their first N questions to save time);
2. ``OUT/adversarial``: IMP with VILLA's adversarial training at its defaults (``vlsparse find-ticket
   --adversarial``; :class:`vlsparse.training.adversarial_config.AdversarialConfig`);
3. ``OUT/cross/<tickets>-tickets-<training>/level_XX``: each kind of ticket re-trained from θ0 the other way
   (``vlsparse train-ticket [--adversarial]``). A ticket re-trained its own way is its IMP level (IMP level k
   trains ticket k from θ0, README "The main job").

Every stage resumes (finished levels and re-trainings are skipped). Prints and writes ``OUT/table.md``: test
VQA score (%) of each kind of ticket trained each way at every level, and the measured training seconds per round.
``--mean DIR [DIR ...]`` trains nothing: the same table over finished runs of several seeds (one ``OUT`` each),
each cell mean ± sample std (and every seed's value), written to ``OUT/table.md``:

    python benchmarks/adversarial_tickets.py --levels 0.5,0.7,0.8 --out runs/adv3 \
        --mean runs/adv3/seed_0 runs/adv3/seed_1 runs/adv3/seed_2

Nothing here is a test: the figures depend on the machine, its load and the step budget.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

from torch.utils.data import Subset

from vlsparse.data import save_task_info
from vlsparse.lottery.config import IMPConfig, parse_levels, train_config
from vlsparse.lottery.imp import run_imp
from vlsparse.lottery.retrain import retrain_ticket
from vlsparse.lottery.runs import Run
from vlsparse.lottery.setup import setup
from vlsparse.pruning.ticket import Ticket
from vlsparse.training.adversarial_config import AdversarialConfig

KINDS = {"standard": None, "adversarial": AdversarialConfig(adversarial=True)}


def _progress(label: str):
    t0 = time.time()

    def report(desc: str, done: int, total: int) -> None:
        if done % 50 == 0 or done == total:
            print(f"{label} {desc}: {done}/{total} steps, {time.time() - t0:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    return report


_LOADED: dict = {}


def _task(model: str, seed: int, eval_questions: int | None):
    """A fresh copy of the model as set up (θ0), easy-VQA (val and test cut to their first ``eval_questions``
    when given) and collate; the task is loaded once per process."""
    key = (model, seed, eval_questions)
    if key not in _LOADED:
        net, data, collate = setup(model, "easy-vqa", seed)
        if eval_questions:
            cut = lambda ds: Subset(ds, range(min(eval_questions, len(ds))))  # noqa: E731
            data = dataclasses.replace(data, val=cut(data.val), test=cut(data.test))
        _LOADED[key] = (net, data, collate)
    net, data, collate = _LOADED[key]
    return copy.deepcopy(net), data, collate


def run_all(out: Path, model: str, levels: list[float], steps: int, seed: int, eval_questions: int | None,
            table_only: bool = False) -> dict:
    """The two IMP runs, then the cross re-trainings (the cheap one, adversarial tickets trained plainly, first);
    returns {(ticket kind, training kind): [metrics or None per level]} (levels 0.. for IMP, 1.. for the cross
    runs). ``table_only``: train nothing, read what is finished."""
    cfgs = {k: train_config(steps=steps, seed=seed, adversarial=a) for k, a in KINDS.items()}
    results = {}
    for kind, cfg in cfgs.items():
        run = Run(out / kind)
        if table_only:
            results[kind, kind] = [run.metrics(k) if run.finished(k) else None for k in range(len(levels) + 1)]
            continue
        net, data, collate = _task(model, seed, eval_questions)
        run.path.mkdir(parents=True, exist_ok=True)
        save_task_info(data, run.task_info)  # as find-ticket does: `vlsparse export` reads it
        results[kind, kind] = run_imp(run.path, net, data, collate,
                                      IMPConfig(model=model, task="easy-vqa", levels=levels, train=cfg),
                                      progress=_progress(kind))
    for tickets, training in (("adversarial", "standard"), ("standard", "adversarial")):
        rows = []
        for k in range(1, len(levels) + 1):
            dest = out / "cross" / f"{tickets}-tickets-{training}" / f"level_{k:02d}"
            if not (dest / "metrics.json").is_file() and not table_only:
                report = _progress(f"{tickets} ticket {k} trained {training}")
                net, data, collate = _task(model, seed, eval_questions)
                run = Run(out / tickets)
                retrain_ticket(Ticket.load(run.ticket(k)), net, data, collate, cfgs[training], dest,
                               theta0=run.theta0, ticket_path=str(run.ticket(k)),
                               progress=lambda s, r=report: r("train", s, steps))
            rows.append(json.loads((dest / "metrics.json").read_text()) if (dest / "metrics.json").is_file() else None)
        results[tickets, training] = rows
    return results


def _grid(cell, levels: list[float]) -> str:
    """The table's header and rows; ``cell(key, i)`` formats run ``key`` (ticket kind, training kind) at index ``i``
    (IMP runs: level i, 0 = dense; cross re-trainings: level i + 1)."""
    std, adv = ("standard", "standard"), ("adversarial", "adversarial")
    lines = ["| sparsity | standard ticket, standard training | standard ticket, adversarial training "
             "| adversarial ticket, standard training | adversarial ticket, adversarial training |",
             "|---:|---:|---:|---:|---:|", f"| 0% (dense) | {cell(std, 0)} | | | {cell(adv, 0)} |"]
    for k, s in enumerate(levels, 1):
        lines.append(f"| {s:.0%} | {cell(std, k)} | {cell(('standard', 'adversarial'), k - 1)} "
                     f"| {cell(('adversarial', 'standard'), k - 1)} | {cell(adv, k)} |")
    return "\n".join(lines)


def table(results: dict, levels: list[float]) -> str:
    """Markdown: one row per sparsity, test VQA score (%) of {standard, adversarial} tickets x training
    ("not run" where a run is missing), then the mean training seconds per round of each kind."""
    def cell(key, i: int) -> str:
        m = results[key][i]
        return f"{100 * m['test']['vqa_score']:.2f}%" if m else "not run"
    timing = []
    for kind in KINDS:
        v = [m["train_seconds"] for m in results[kind, kind] if m]
        if v:
            timing.append(f"{kind} training {sum(v) / len(v):.0f} s per round (rounds: {', '.join(f'{x:.0f}' for x in v)})")
    return _grid(cell, levels) + f"\n\nMeasured: {'; '.join(timing)}.\n"


def mean_table(runs: list[dict], levels: list[float]) -> str:
    """Markdown: :func:`table`'s cells over several seeds' results (:func:`run_all` dicts), each "mean ± std (a, b,
    ...)" in % (std: the sample standard deviation; "not run" where a seed lacks the run), then the mean training
    seconds per round of each kind over every round of every seed."""
    def cell(key, k: int) -> str:
        v = [100 * r[key][k]["test"]["vqa_score"] if r[key][k] else None for r in runs]
        if None in v:
            return "not run"
        sd = f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else ""
        return f"{statistics.fmean(v):.2f}{sd} ({', '.join(f'{x:.2f}' for x in v)})"
    timing = []
    for kind in KINDS:
        v = [m["train_seconds"] for r in runs for key, rows in r.items() if key[1] == kind for m in rows if m]
        if v:
            timing.append(f"{kind} training {statistics.fmean(v):.0f} s per round over {len(v)} rounds "
                          f"({min(v):.0f}-{max(v):.0f})")
    return (f"{len(runs)} seeds, test VQA score (%): mean ± std (each seed)\n\n" + _grid(cell, levels)
            + f"\n\nMeasured: {'; '.join(timing)}.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/adv-tickets"))
    ap.add_argument("--model", default="uniter-minilm-l2")
    ap.add_argument("--levels", default="0.5,0.7,0.8")
    ap.add_argument("--steps", type=int, default=500, help="training steps per round (the main job: 500)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-questions", type=int, default=None,
                    help="evaluate on the first N val and test questions only (default: all)")
    ap.add_argument("--table-only", action="store_true", help="train nothing: the table of what is finished")
    ap.add_argument("--mean", type=Path, nargs="+", metavar="DIR",
                    help="train nothing: mean ± std over these finished runs (one --out per seed)")
    args = ap.parse_args()
    levels = parse_levels(args.levels, float(args.levels.split(",")[-1]))
    if args.mean:
        text = mean_table([run_all(d, args.model, levels, args.steps, 0, None, table_only=True) for d in args.mean],
                          levels)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(text)
        print(text)
        return
    t0 = time.time()
    results = run_all(args.out, args.model, levels, args.steps, args.seed, args.eval_questions, args.table_only)
    text = table(results, levels) + f"Total {time.time() - t0:.0f} s; load {os.getloadavg()}.\n"
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
