"""The settings of adversarial training (VILLA's finetuning stage), torch-free so that the CLI builds its options
from them (``--adversarial``, ``--adv-steps``, ... of ``vlsparse find-ticket``,
``train-ticket``, ``transfer`` and ``pretrain``).

Defaults and where they come from (VILLA: Gan et al. 2020, "Large-Scale Adversarial Training for
Vision-and-Language Representation Learning", NeurIPS; its code is github.com/zhegan27/VILLA):

* ``adv_steps`` 3, ``adv_lr`` 1e-3, ``adv_kl_weight`` 1.5, ``adv_norm`` "l2", ``adv_modality`` "text" and an
  unbounded ball (``adv_eps`` None): VILLA's UNITER finetuning configs (``config/train-vqa-base-4gpu-adv.json``:
  ``adv_steps 3``, ``adv_lr_txt 1e-3``, ``adv_lr_img 1e-3``, ``norm_type l2``, ``adv_max_norm 0`` (= unlimited),
  ``adv_kl_weight 1.5``, ``adv_modality ["text"]``); its LXMERT port uses the same values for VQA and NLVR2.
  VILLA has separate step sizes for text and image (equal in those configs): here one ``adv_lr`` serves both.
* The paper text at hand (Gan et al. 2022, Q7 / Fig. 5) gives no adversarial hyper-parameters; it only says
  adversarial training follows Gan et al. 2020.
* ``both`` perturbs the two modalities one at a time, in separate forward passes (VILLA's ``alter`` mode, the
  "one modality at a time" of VILLA Section 3), not jointly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

MODALITIES = {"text": ("text",), "image": ("image",), "both": ("text", "image")}
NORMS = ("l2", "linf")


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class AdversarialConfig:
    """Adversarial training in the embedding space (VILLA finetuning; see the module docstring for the sources).

    Fields:
        adversarial: train adversarially (False: plain training; the other fields are still checked).
        adv_steps: K, forward-backward passes with a perturbation per modality and training step (K - 1
            projected ascent steps on the perturbation; parameter gradients are accumulated over all K, FreeLB).
        adv_lr: step size of one ascent step, in embedding units: the step is ``adv_lr * g / ||g||`` per
            example (``||.||`` the L2 or L-inf norm of ``adv_norm``), so an L2 step has length ``adv_lr``.
        adv_eps: radius ε of the ball the perturbation is projected onto after each step (per example, over
            all its positions and features); None: unbounded (VILLA's ``adv_max_norm 0``).
        adv_kl_weight: weight of the symmetric KL divergence between clean and perturbed answer distributions.
        adv_modality: "text" (word embeddings), "image" (the backbone's image embeddings) or "both".
        adv_norm: "l2" or "linf": the norm of the step normalisation and of the ball.

    Raises:
        ValueError: adv_steps < 1, adv_lr <= 0, adv_eps <= 0, adv_kl_weight < 0, an unknown modality or norm.
    """

    adversarial: bool = _option(False, "train adversarially: VILLA's embedding-space PGD/FreeLB with a "
                                       "symmetric-KL term (Gan et al. 2020)")
    adv_steps: int = _option(3, "adversarial: forward-backward passes per modality and step (VILLA: 3)")
    adv_lr: float = _option(1e-3, "adversarial: ascent step size, normalised gradient (VILLA: 1e-3)")
    adv_eps: Optional[float] = _option(None, "adversarial: radius of the perturbation ball; default unbounded "
                                             "(VILLA: adv_max_norm 0)")
    adv_kl_weight: float = _option(1.5, "adversarial: weight of the symmetric-KL term (VILLA: 1.5)")
    adv_modality: str = _option("text", "adversarial: text | image | both (one at a time); VILLA VQA: text")
    adv_norm: str = _option("l2", "adversarial: l2 | linf ball and step normalisation (VILLA: l2)")

    def __post_init__(self):
        if self.adv_steps < 1:
            raise ValueError(f"--adv-steps must be >= 1, got {self.adv_steps}")
        if self.adv_lr <= 0:
            raise ValueError(f"--adv-lr must be > 0, got {self.adv_lr}")
        if self.adv_eps is not None and self.adv_eps <= 0:
            raise ValueError(f"--adv-eps must be > 0 (leave it out for an unbounded ball), got {self.adv_eps}")
        if self.adv_kl_weight < 0:
            raise ValueError(f"--adv-kl-weight must be >= 0, got {self.adv_kl_weight}")
        if self.adv_modality not in MODALITIES:
            raise ValueError(f"--adv-modality must be one of {', '.join(MODALITIES)}, got {self.adv_modality!r}")
        if self.adv_norm not in NORMS:
            raise ValueError(f"--adv-norm must be one of {', '.join(NORMS)}, got {self.adv_norm!r}")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities perturbed, in order: ("text",), ("image",) or ("text", "image")."""
        return MODALITIES[self.adv_modality]


def adversarial_config(**options) -> AdversarialConfig | None:
    """The AdversarialConfig of command-line options (its field names), or None without ``adversarial``.

    Raises:
        ValueError: see :class:`AdversarialConfig` (checked with or without ``--adversarial``).
    """
    cfg = AdversarialConfig(**options)
    return cfg if cfg.adversarial else None


def training_meta(adversarial: AdversarialConfig | None) -> dict[str, str]:
    """Ticket-header strings naming how the subnetwork was trained: ``training`` ("standard" or "adversarial")
    and, for adversarial training, ``adversarial`` (the settings as JSON)."""
    if adversarial is None:
        return {"training": "standard"}
    return {"training": "adversarial", "adversarial": json.dumps(asdict(adversarial), sort_keys=True)}


__all__ = ["AdversarialConfig", "MODALITIES", "NORMS", "adversarial_config", "training_meta"]
