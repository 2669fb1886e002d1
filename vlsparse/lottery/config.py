"""What defines a lottery run, torch-free: the sparsity schedule, :class:`IMPConfig`, and the settings the
command line builds from its options (``vlsparse find-ticket``, ``train-ticket``, ``main-job``).

IMPConfig's fields carry their help text in ``metadata["help"]``, as TrainConfig's do
(:mod:`vlsparse.training.config`); the CLI generates its options from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vlsparse.pruning.blocks import parse_block
from vlsparse.training.config import TrainConfig

#: the ``--task`` of IMP on the pre-training objectives (task-agnostic tickets, Gan et al. 2022 sec. 3 (ii))
PRETRAIN = "pretrain"


def schedule(target: float, step: float = 0.1, rate: float | None = None) -> list[float]:
    """Sparsity levels after level 0 (dense), ending exactly at ``target``.

    Default: 0.1, 0.2, ... (each round removes what is needed to reach the next level).
    ``rate``: remove that fraction of the *remaining* weights per round (Frankle & Carbin 2019):
    s_{k+1} = 1 - (1 - s_k)(1 - rate). Fractions in [0, 1). Raises ValueError outside that range.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {target}")
    levels: list[float] = []
    if rate is not None:
        if not 0.0 < rate < 1.0:
            raise ValueError(f"--rate must be in (0, 1), got {rate}")
        s = 0.0
        while (s := 1.0 - (1.0 - s) * (1.0 - rate)) < target - 1e-9:
            levels.append(round(s, 6))
    else:
        k = 1
        while k * step < target - 1e-9:
            levels.append(round(k * step, 6))
            k += 1
    return levels + [target] if target > 0 else levels


def parse_levels(levels: str | None, sparsity: float, rate: float | None = None) -> list[float]:
    """The sparsity levels of a run: ``levels`` ("0.5,0.6,0.7", fractions) if given, else :func:`schedule`
    up to ``sparsity`` (with ``rate``).

    Raises:
        ValueError: ``levels`` is not a comma-separated list of numbers or does not end at ``sparsity``;
            see :func:`schedule` for ``sparsity`` and ``rate``.
    """
    if levels is None:
        return schedule(sparsity, rate=rate)
    try:
        out = [float(x) for x in levels.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--levels must be comma-separated fractions like 0.5,0.7, got {levels!r}") from None
    if not out or abs(out[-1] - sparsity) > 1e-9:
        raise ValueError(f"--levels must end at --sparsity {sparsity}, got {levels!r}")
    return out


def train_config(**options) -> TrainConfig:
    """A TrainConfig from command-line options (TrainConfig's field names), with the warm-up capped at
    ``steps`` so that a short run still reaches the peak learning rate.

    Raises:
        ValueError: see :class:`TrainConfig`.
    """
    steps = options.get("steps", TrainConfig.steps)
    warmup = options.get("warmup", TrainConfig.warmup)
    return TrainConfig(**{**options, "warmup": min(warmup, steps)})


@dataclass
class IMPConfig:
    """What defines a run: everything here must match to resume into an existing RUN.

    Raises:
        ValueError: levels that are not increasing fractions in [0, 1), or ``rewind_step`` outside
            [0, train.steps).
    """

    model: str
    task: str
    levels: list[float]
    train: TrainConfig = field(default_factory=TrainConfig)
    rewind_step: int = field(default=0, metadata={"help": "rewind to θ_i after i steps instead of θ0"})
    theta0: str | None = field(default=None, metadata={"help": "θ0 weights (safetensors state_dict) instead of "
                                                                "--model's own"})
    init: str = field(default="pretrained", metadata={"help": "pretrained | text-only | shuffled | random"})
    corpus: str | None = field(default=None, metadata={"help": "--task pretrain: easy-vqa-captions or a COCO "
                                                                "captions file"})
    objectives: str = field(default="mlm,mrfr,itm,wra", metadata={"help": "--task pretrain: objectives"})
    proportions: str | None = field(default=None, metadata={"help": "--task pretrain: share of batches per "
                                                                     "objective, e.g. 2,1,2,1 (default equal)"})
    block: str = field(default="1x1", metadata={"help": "prune whole ROWSxCOLS blocks by their L2 norm, e.g. 1x4 "
                                                        "(4 consecutive inputs: what the int8 kernel multiplies)"})

    def __post_init__(self):
        if any(not 0.0 <= s < 1.0 for s in self.levels) or self.levels != sorted(set(self.levels)):
            raise ValueError(f"sparsity levels must be increasing fractions in [0, 1), got {self.levels}")
        if not 0 <= self.rewind_step < self.train.steps:
            raise ValueError(f"--rewind-step must be in [0, steps={self.train.steps}), got {self.rewind_step}")
        parse_block(self.block)
        if (self.task == PRETRAIN) != (self.corpus is not None):
            raise ValueError("--task pretrain needs --corpus (and --corpus needs --task pretrain)")
        if self.task == PRETRAIN and self.rewind_step:
            raise ValueError("--rewind-step is not supported with --task pretrain")

    def identity(self) -> dict:
        """The JSON-able fields compared on resume (the device is free to change; the θ0 and pre-training
        fields only when they are not their defaults, and ``train.adversarial`` only for adversarial training,
        so that earlier runs resume)."""
        d = asdict(self)
        d["train"] = self.train.identity()
        defaults = {"theta0": None, "init": "pretrained", "corpus": None, "proportions": None, "block": "1x1"}
        drop = [k for k, v in defaults.items() if d[k] == v] + ([] if self.task == PRETRAIN else ["objectives"])
        return {k: v for k, v in d.items() if k not in drop}


__all__ = ["PRETRAIN", "IMPConfig", "parse_levels", "schedule", "train_config"]
