"""The hyper-parameters of one training run (torch-free, so that the CLI can build its options from them).

Every field carries its help text in ``metadata["help"]``: ``vlsparse find-ticket``, ``train-ticket`` and
``main-job`` generate their ``--steps``, ``--batch-size``, ``--lr``, ... options from these fields, so the
defaults below are the only ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from vlsparse.training.adversarial_config import AdversarialConfig


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    steps: optimizer steps; batch_size: questions per step; lr / head_lr: peak learning rates of
    pre-trained / new parameters; warmup: linear warm-up steps; weight_decay: AdamW decoupled decay;
    seed: data order and dropout; device: "cpu" or "cuda"; compact_vocab: train only the word
    embeddings of tokens the training questions use (see :class:`vlsparse.training.loop.CompactVocab`);
    adversarial: VILLA-style adversarial training instead of plain training (None: plain;
    :mod:`vlsparse.training.adversarial`).

    Raises:
        ValueError: steps or batch_size below 1, a learning rate <= 0, an unknown device, or "cuda"
            without a GPU.
    """

    steps: int = _option(500, "training steps")
    batch_size: int = _option(32, "examples per training step")
    lr: float = _option(1e-4, "peak learning rate of the pre-trained weights")
    head_lr: float = _option(1e-3, "lr of image embeddings and head")
    warmup: int = _option(100, "linear learning-rate warm-up steps")
    weight_decay: float = _option(0.01, "AdamW decoupled weight decay")
    seed: int = _option(0, "seed of the head's initialisation, data order and dropout")
    device: str = _option("cpu", "cpu | cuda")
    compact_vocab: bool = _option(True, "train only the word embeddings of tokens the training questions use")
    adversarial: Optional[AdversarialConfig] = _option(None, "adversarial training settings (None: plain training)")

    def identity(self) -> dict:
        """The JSON-able fields that define a training (compared when a run resumes): all but the device, and
        ``adversarial`` only when set (runs written before adversarial training existed still resume)."""
        return {k: v for k, v in asdict(self).items() if k != "device" and (k != "adversarial" or v)}

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError(f"learning rates must be > 0, got lr={self.lr}, head_lr={self.head_lr}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda":
            import torch  # the `train` extra: only asked when a GPU is requested, so the CLI imports this torch-free

            if not torch.cuda.is_available():
                raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")


__all__ = ["TrainConfig"]
