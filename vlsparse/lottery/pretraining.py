"""VL pre-training as a command (``vlsparse pretrain``) and IMP on the pre-training objectives
(``vlsparse find-ticket --task pretrain``: task-agnostic tickets, Gan et al. 2022 sec. 3 (ii)).

``vlsparse pretrain --out DIR`` writes, all at once (into a temporary sibling, then renamed)::

    DIR/config.json                  the model's configuration (image embeddings marked pre-trained,
                                     ``pretrained_from`` = the model pre-training started from)
    DIR/model.safetensors            the backbone with its pre-trained image embeddings (save_pretrained)
    DIR/pretrain_heads.safetensors   the MLM / MRFR / ITM heads (pre-training resumes from them; never needed
                                     to load DIR with --model DIR)
    DIR/pretrain_metrics.json        held-out metrics before and after, objectives, steps, batch size, the
                                     training method (``training``: standard | adversarial, and the
                                     ``adversarial`` settings as JSON, as in tickets), corpus, seconds

With ``cfg.adversarial`` pre-training is adversarial (VILLA's adversarial pre-training,
:mod:`vlsparse.training.pretrain`). Under torchrun every rank pre-trains its share of each batch and rank 0
writes DIR (:mod:`vlsparse.training.distributed`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlsparse.atomic import locked, write_json
from vlsparse.data.corpus import CaptionCorpus, load_corpus
from vlsparse.data.options import LoadOptions
from vlsparse.lottery.config import IMPConfig
from vlsparse.lottery.imp import reinit_check, run_imp, start_from
from vlsparse.lottery.runs import check_config
from vlsparse.models.registry import load_model, load_tokenizer
from vlsparse.training.adversarial_config import training_meta
from vlsparse.training.config import TrainConfig
from vlsparse.training.distributed import main_only
from vlsparse.training.objectives import PretrainHeads, parse_objectives
from vlsparse.training.pretrain import evaluate_pretraining, new_heads, pretrain

__all__ = ["HEADS_FILE", "METRICS_FILE", "PretrainRounds", "find_pretrain_ticket", "load_pretraining", "run_pretrain"]

HEADS_FILE, METRICS_FILE = "pretrain_heads.safetensors", "pretrain_metrics.json"


def load_pretraining(model: str, corpus: str, seed: int, data_dir: str | os.PathLike | None = None,
                     ) -> tuple[nn.Module, PretrainHeads, CaptionCorpus]:
    """The model ``model`` sized for the corpus's region features (its task head unused), its pre-training heads
    (``model``'s own when it is a directory holding :data:`HEADS_FILE`, else new ones from ``seed``) and the
    corpus (:func:`vlsparse.data.corpus.load_corpus`, split and negatives from ``seed``).

    Raises:
        FileNotFoundError / ValueError: see :func:`~vlsparse.data.corpus.load_corpus`; CheckpointError
            (a ValueError): a model whose region feature size differs from the corpus's (names the model).
    """
    data = load_corpus(corpus, load_tokenizer(model), LoadOptions(data_dir=data_dir, seed=seed))
    net, _ = load_model(model, img_dim=data.region_feature_dim, num_answers=1, seed=seed)
    heads = new_heads(net, seed)
    own = Path(model) / HEADS_FILE
    if own.is_file():
        heads.load_state_dict(load_file(str(own)))
    return net, heads, data


@locked("out", sibling=True)
def run_pretrain(model: str, corpus: str, out: str | os.PathLike, cfg: TrainConfig, objectives: str = "mlm,mrfr,itm,wra",
                 proportions: str | None = None, data_dir: str | os.PathLike | None = None,
                 progress: Callable[[int, dict], None] | None = None) -> dict:
    """``vlsparse pretrain``: pre-train ``model`` on ``corpus`` and write DIR = ``out`` (see the module docstring).

    Returns:
        the content of DIR/pretrain_metrics.json: ``before`` / ``after`` held-out metrics
        (:func:`~vlsparse.training.pretrain.evaluate_pretraining`), ``objectives`` (name -> share), ``steps``,
        ``seed``, ``batch_size``, ``training`` (and ``adversarial``: :func:`~vlsparse.training.adversarial_config.
        training_meta`), ``corpus`` (name, images, captions, vocabulary), ``pretrained_from``, ``train_seconds``.

    Raises:
        ValueError: ``out`` exists, bad objectives or proportions (checked before anything is loaded); see
            :func:`load_pretraining`.
        RunLockedError: another process pre-trains into ``out`` (the lock is ``PARENT/.NAME.lock``, held
            from start to end; a killed run's ``.NAME.tmp-*`` directory is removed by the next run).
    """
    out = Path(out)
    if main_only(out.exists):
        raise ValueError(f"--out {out}: exists; pre-training writes a new directory")
    mix = parse_objectives(objectives, proportions)
    net, heads, data = load_pretraining(model, corpus, cfg.seed, data_dir)
    before = evaluate_pretraining(net, heads, data.heldout, device=cfg.device)
    t0 = time.time()
    pretrain(net, heads, None, data.train, mix, cfg, progress)
    seconds = time.time() - t0
    after = evaluate_pretraining(net, heads, data.heldout, device=cfg.device)
    origin = getattr(net.config, "pretrained_from", None) if getattr(net.config, "img_embeddings_pretrained",
                                                                      False) else None
    net.config.img_embeddings_pretrained, net.config.pretrained_from = True, origin or model
    metrics = {"before": before, "after": after, "objectives": mix, "steps": cfg.steps, "seed": cfg.seed,
               "batch_size": cfg.batch_size, **training_meta(cfg.adversarial), "corpus": data.stats,
               "pretrained_from": net.config.pretrained_from, "train_seconds": round(seconds, 1)}
    main_only(lambda: _write_pretrained(out, net, heads, metrics))  # rank 0 writes; the others wait
    return metrics


def _write_pretrained(out: Path, net: nn.Module, heads: PretrainHeads, metrics: dict) -> None:
    """Write DIR (module docstring) into a temporary sibling, then rename it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # a killed run's: removed by the lock
    try:
        net.cpu().save_pretrained(str(tmp))
        save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, str(tmp / HEADS_FILE))
        write_json(tmp / METRICS_FILE, metrics)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class PretrainRounds:
    """IMP rounds on the pre-training objectives (:func:`vlsparse.lottery.imp.run_imp`): each round resets the
    heads to their initial state and pre-trains ``cfg.train.steps`` steps with the round's mask; the metrics
    are the held-out pre-training metrics (``val``; ``test`` is empty: the tickets are judged by training them
    on downstream tasks, as the paper does)."""

    def __init__(self, heads: PretrainHeads, corpus: CaptionCorpus, objectives: dict[str, float]):
        self.heads, self.corpus, self.objectives = heads, corpus, objectives
        self.heads0 = {k: v.detach().clone() for k, v in heads.state_dict().items()}

    def train(self, model: nn.Module, mask, cfg: IMPConfig, progress, snapshot_step, start_step) -> None:
        """Pre-train from the heads' initial state with ``mask`` (rewinding is not offered)."""
        self.heads.load_state_dict(self.heads0)
        pretrain(model, self.heads, mask, self.corpus.train, self.objectives, cfg.train,
                 (lambda s, _r: progress(s)) if progress else None)

    def evaluate(self, model: nn.Module, device: str) -> dict:
        """``{"val": held-out pre-training metrics, "test": {}}``."""
        return {"val": evaluate_pretraining(model, self.heads, self.corpus.heldout, device=device), "test": {}}


def find_pretrain_ticket(run: str | os.PathLike, cfg: IMPConfig, data_dir: str | os.PathLike | None = None,
                         progress: Callable[[str, int, int], None] | None = None) -> tuple[list[dict], CaptionCorpus]:
    """``vlsparse find-ticket --task pretrain --corpus C``: IMP whose rounds pre-train (:class:`PretrainRounds`) from
    θ0 (``cfg.model``, or ``cfg.theta0`` / ``cfg.init``) and prune by global magnitude. Tickets carry
    ``task=pretrain``, the objectives, the corpus and the held-out metrics of their round.

    Returns:
        (the metrics of every level, the corpus).

    Raises:
        ValueError: bad objectives / proportions / init, a run with another configuration; see
            :func:`load_pretraining`.
    """
    mix = parse_objectives(cfg.objectives, cfg.proportions)
    reinit_check(cfg.init)
    net, heads, data = load_pretraining(cfg.model, cfg.corpus, cfg.train.seed, data_dir)
    main_only(lambda: check_config(run, cfg))
    start_from(net, cfg)
    torch.manual_seed(cfg.train.seed)
    return run_imp(run, net, None, None, cfg, progress, rounds=PretrainRounds(heads, data, mix)), data
