"""The options every task loader shares (:class:`LoadOptions`), built once by :func:`vlsparse.data.load_task`.

Torch-free, like the task registry that builds them: importing :mod:`vlsparse.data` must not import torch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["LoadOptions", "VISUALS", "TEXT_LEN", "IMAGE_SIZE"]

#: what a task can give a model about its images: region features + boxes, or pixels (ViLT)
VISUALS = ("regions", "pixels")
#: the default text length in tokens, [CLS] and [SEP] included (VCR's question + answer + rationale: 80)
TEXT_LEN = 40
#: the default shortest image edge in pixels of ``visual="pixels"``, as ViLT was trained (easy-VQA: 96)
IMAGE_SIZE = 384


@dataclass(frozen=True)
class LoadOptions:
    """What every task loader is told, besides the tokenizer and its own task-specific keywords.

    ``load_task(name, tokenizer, data_dir=..., visual=..., val_fraction=...)`` builds one from its
    keywords (:meth:`from_keywords`); a loader called directly takes one as its second argument,
    e.g. ``load_gqa(tokenizer, LoadOptions("data/gqa", visual="pixels"))``.

    Raises:
        ValueError: ``visual`` not one of :data:`VISUALS` (the other fields are checked where they are
            used: ``val_fraction`` by the split, ``max_text_len`` by the dataset, ``image_size`` by the
            image processor).
    """

    #: the folder the data set ships in (``--data-dir``; each loader names the files it reads). None: only
    #: easy-VQA loads, whose data ships in the ``easy_vqa`` package; the others raise FileNotFoundError.
    data_dir: str | os.PathLike | None = None
    #: where extracted region features (easy-VQA) and TSV feature indexes are kept; None:
    #: ``$VLSPARSE_CACHE`` or ``~/.cache/vlsparse``
    cache_dir: str | os.PathLike | None = None
    #: "regions" (region features + boxes, UNITER / LXMERT) or "pixels" (images through
    #: ViltImageProcessor, ViLT); see ``vlsparse.models.visual_input``
    visual: str = "regions"
    #: texts are truncated to this many tokens, [CLS] and [SEP] included (>= 2); None: the task's
    #: default, :data:`TEXT_LEN` = 40 (VCR: 80)
    max_text_len: int | None = None
    #: shortest image edge in pixels after resizing, for ``visual="pixels"`` (a positive multiple of 32);
    #: None: the task's default, :data:`IMAGE_SIZE` = 384 (easy-VQA: 96)
    image_size: int | None = None
    #: fraction (0..1) of the train images, with all their questions, held out as the val split by the
    #: tasks without a val split of their own (easy-VQA, VQA v2, VCR); the other tasks ignore it
    val_fraction: float = 0.1
    #: seed of that val split and of Flickr30k's sampled negatives
    seed: int = 0

    def __post_init__(self) -> None:
        if self.visual not in VISUALS:
            raise ValueError(f"visual must be one of {', '.join(VISUALS)}, got {self.visual!r}")

    @classmethod
    def from_keywords(cls, **kw: Any) -> tuple[LoadOptions, dict[str, Any]]:
        """``(LoadOptions of the keywords that are its fields, the other keywords)``: the others are a
        loader's task-specific ones (e.g. ``negatives`` of Flickr30k); a loader refuses any it does not
        know with TypeError, as Python does."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kw.items() if k in names}), {k: v for k, v in kw.items() if k not in names}

    def with_defaults(self, max_text_len: int = TEXT_LEN, image_size: int = IMAGE_SIZE) -> LoadOptions:
        """These options with a task's defaults for ``max_text_len`` and ``image_size`` where they are None."""
        return dataclasses.replace(self, max_text_len=max_text_len if self.max_text_len is None else self.max_text_len,
                                   image_size=image_size if self.image_size is None else self.image_size)
