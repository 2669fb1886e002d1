"""UNITER's pre-training objectives (Chen et al., ECCV 2020, "UNITER", Sections 3.1-3.2), one module each.

* :mod:`~vlsparse.training.objectives.mlm`: masked language modelling conditioned on all regions;
* :mod:`~vlsparse.training.objectives.mrfr`: masked region feature regression (MRM; MRC-kl needs detector
  class distributions, which our region features do not carry);
* :mod:`~vlsparse.training.objectives.itm`: image-text matching;
* :mod:`~vlsparse.training.objectives.wra`: word-region alignment by optimal transport (IPOT).

Conditional masking (Sec. 3.2): MLM masks only words and MRFR only regions, so one modality is masked per
example. Every objective is an :class:`Objective` (its random choices, ``draw``, apart from its ``loss``), called
as ``fn(model, heads, batch, ctx, gen) -> Step`` on a batch of :class:`vlsparse.data.corpus.CaptionSet` items;
objectives are sampled per batch in proportions (:func:`parse_objectives`), as the official ``MetaLoader``
samples tasks by ``mix_ratio``.
"""

from __future__ import annotations

from vlsparse.training.objectives.common import Context, Objective, PretrainHeads, Step
from vlsparse.training.objectives.itm import ITM
from vlsparse.training.objectives.mlm import MLM
from vlsparse.training.objectives.mrfr import MRFR
from vlsparse.training.objectives.wra import WRA

__all__ = ["OBJECTIVES", "Context", "Objective", "PretrainHeads", "Step", "parse_objectives"]

#: objective name -> :class:`Objective` (``draw`` then ``loss``; calling it, ``fn(model, heads, batch, ctx, gen)
#: -> Step``, does both)
OBJECTIVES: dict[str, Objective] = {"mlm": MLM, "mrfr": MRFR, "itm": ITM, "wra": WRA}


def parse_objectives(objectives: str, proportions: str | None = None) -> dict[str, float]:
    """``"mlm,itm"`` and ``"2,1"`` -> ``{"mlm": 2/3, "itm": 1/3}`` (probability of each objective per batch;
    no proportions: equal).

    Raises:
        ValueError: an unknown or repeated objective (names --objectives), proportions that are not numbers,
            not one per objective, negative, or that do not sum to a positive number (names --proportions).
    """
    names = [n.strip() for n in objectives.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVES]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"--objectives {objectives!r}: expected distinct names among {', '.join(OBJECTIVES)}")
    try:
        weights = [1.0] * len(names) if proportions is None else [float(x) for x in proportions.split(",")]
    except ValueError:
        raise ValueError(f"--proportions {proportions!r}: expected comma-separated numbers") from None
    if len(weights) != len(names) or any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"--proportions {proportions!r}: expected {len(names)} non-negative numbers with a "
                         "positive sum, one per objective")
    total = sum(weights)
    return {n: w / total for n, w in zip(names, weights)}
