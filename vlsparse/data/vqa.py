"""VQA-style data: soft answer targets, the VQA score, a torch Dataset and its collate.

Conventions (VQA v2, as used by UNITER and LXMERT fine-tuning):

* Every question has up to 10 human answers.  An answer given by ``count`` annotators gets
  the soft score ``min(count / 3, 1)`` (the VQA accuracy formula of Antol et al., ICCV 2015,
  "VQA: Visual Question Answering", kept for VQA v2 by Goyal et al., CVPR 2017).  Note:
  the official evaluation script averages this formula over the 10 leave-one-annotator-out
  subsets, and the target files that UNITER/LXMERT inherit from bottom-up-attention-vqa
  (Teney et al. / Anderson et al., 2018) use the stepped scores 0.3/0.6/0.9/1.0 for 1/2/3/4+
  annotators.  We use the plain formula; for single-answer data such as easy-VQA all three
  agree (score 1 for the given answer).
* The model is trained on the soft target vector (binary cross-entropy per answer) and
  evaluated with the "VQA score": the target score of the arg-max answer, averaged over
  questions (``compute_score_with_logits`` in the UNITER/LXMERT/bottom-up trainers).

Batches (see :func:`collate`) hold exactly ``input_ids``, ``attention_mask``, ``img_feat``,
``img_pos``, ``img_mask`` and ``targets`` (region tasks, ``visual="regions"``), or
``input_ids``, ``attention_mask``, ``pixel_values``, ``pixel_mask`` and ``targets`` (image
pixels for ViLT, ``visual="pixels"``, see :mod:`vlsparse.data.pixels`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .pixels import PixelImages

__all__ = [
    "PAD_TOKEN_ID",
    "soft_score",
    "answer_targets",
    "vqa_score",
    "VQAExample",
    "VQADataset",
    "collate",
    "split_by_image",
    "region_feature_stats",
    "standardize_regions",
    "TaskData",
    "VISUALS",
]

#: Text padding id (BERT's [PAD]).
PAD_TOKEN_ID = 0

#: what a task can give a model about its images: region features + boxes, or pixels (ViLT)
VISUALS = ("regions", "pixels")


def soft_score(count: int) -> float:
    """VQA soft score of an answer given by ``count`` annotators: ``min(count / 3, 1)``."""
    if count < 0:
        raise ValueError(f"negative annotator count {count}")
    return min(count / 3.0, 1.0)


def _vocab_index(vocab: Sequence[str] | Mapping[str, int]) -> dict[str, int]:
    if isinstance(vocab, Mapping):
        return dict(vocab)
    index = {a: i for i, a in enumerate(vocab)}
    if len(index) != len(vocab):
        raise ValueError("answer vocabulary has duplicates")
    return index


def _score_vector(scores: Mapping[str, float], index: Mapping[str, int], n: int) -> torch.Tensor:
    t = torch.zeros(n, dtype=torch.float32)
    for a, s in scores.items():
        i = index.get(a)
        if i is not None:  # answers outside the vocabulary are dropped (as in UNITER/LXMERT)
            t[i] = float(s)
    return t


def answer_targets(
    answer_counts: Mapping[str, int], vocab: Sequence[str] | Mapping[str, int]
) -> torch.Tensor:
    """Soft target vector (A,) float32: ``soft_score(count)`` at each answer's vocabulary
    index, 0 elsewhere; answers not in ``vocab`` are ignored.

    ``vocab`` is a list of answers (index = position) or a dict answer -> index.
    """
    index = _vocab_index(vocab)
    n = (max(index.values()) + 1) if index else 0
    return _score_vector({a: soft_score(c) for a, c in answer_counts.items()}, index, n)


def vqa_score(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-question VQA score (B,): the target score of the arg-max answer of ``logits``.

    ``logits`` and ``targets`` are (B, A); the mean over a data set is the VQA accuracy.
    """
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"expected (B, A) logits and targets, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    pred = logits.argmax(dim=1, keepdim=True)
    return targets.gather(1, pred).squeeze(1).to(torch.float32)


@dataclass
class VQAExample:
    """One question.  ``answers`` maps answer -> soft score (already ``soft_score``-ed).

    ``question_type`` is an optional free-form tag for per-type reports ("" if unknown).
    """

    question: str
    image_id: Hashable
    answers: dict[str, float]
    question_type: str = ""


def split_by_image(
    examples: Sequence[VQAExample], val_fraction: float, seed: int = 0
) -> tuple[list[VQAExample], list[VQAExample]]:
    """Split ``examples`` into (train, val) by image: ``round(val_fraction * n_images)``
    images chosen at random (``numpy.random.default_rng(seed)``) go to val with all their
    questions; no image is in both.  Example order is preserved within each split."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = sorted({e.image_id for e in examples}, key=lambda x: (type(x).__name__, x))
    n_val = int(round(val_fraction * len(ids)))
    if val_fraction > 0 and n_val == 0 and len(ids) > 1:
        n_val = 1
    perm = np.random.default_rng(seed).permutation(len(ids))
    val_ids = {ids[i] for i in perm[:n_val]}
    train = [e for e in examples if e.image_id not in val_ids]
    val = [e for e in examples if e.image_id in val_ids]
    return train, val


def region_feature_stats(
    features: np.ndarray | Sequence[np.ndarray], eps: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (D,) float32 over all regions of the given images.

    ``features`` is (M, N, D) or a sequence of (N_i, D) arrays -- pass the *train* images
    only.  Dimensions with std < ``eps`` (constant on train) get std 1.
    """
    if isinstance(features, np.ndarray):
        flat = features.reshape(-1, features.shape[-1])
    else:
        flat = np.concatenate([np.asarray(f).reshape(-1, np.asarray(f).shape[-1]) for f in features])
    flat = flat.astype(np.float64)
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    std = np.where(std < eps, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def standardize_regions(
    regions: Mapping[Hashable, tuple[np.ndarray, np.ndarray]], mean: np.ndarray, std: np.ndarray
) -> dict[Hashable, tuple[np.ndarray, np.ndarray]]:
    """``(features - mean) / std`` for every image; boxes are left as they are."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    return {k: (((f - mean) / std).astype(np.float32), b) for k, (f, b) in regions.items()}


class VQADataset(Dataset):
    """Questions + region features (or image pixels) -> model inputs and soft targets.

    Args:
        examples: the questions.
        regions: image_id -> ``(features (N, D) float32, boxes (N, 7) float32)``, already
            standardised (see :func:`standardize_regions`); or a
            :class:`~vlsparse.data.pixels.PixelImages` (``visual`` is then "pixels").  Every
            example's image must be in it.
        tokenizer: a BERT-style tokenizer (e.g. ``BertTokenizerFast``) that adds
            ``[CLS] ... [SEP]``.
        answer_vocab: list of answers (index = logit position) or dict answer -> index.
        max_text_len: questions are truncated to this many tokens, [CLS] and [SEP] included.

    Items are dicts of tensors: ``input_ids`` (L,) int64, ``img_feat`` (N, D) float32,
    ``img_pos`` (N, 7) float32, ``targets`` (A,) float32; with pixels ``pixel_values`` (3, H, W)
    float32 and ``pixel_mask`` (H, W) int64 instead of ``img_feat``/``img_pos``.  Batch them with
    :func:`collate`.
    """

    def __init__(
        self,
        examples: Sequence[VQAExample],
        regions: Mapping[Hashable, tuple[np.ndarray, np.ndarray]],
        tokenizer: Any,
        answer_vocab: Sequence[str] | Mapping[str, int],
        max_text_len: int = 40,
    ):
        if max_text_len < 2:
            raise ValueError("max_text_len must leave room for [CLS] and [SEP]")
        self.examples = list(examples)
        self.answer_index = _vocab_index(answer_vocab)
        self.num_answers = (max(self.answer_index.values()) + 1) if self.answer_index else 0
        self.max_text_len = max_text_len
        missing = {e.image_id for e in self.examples} - set(regions)
        if missing:
            raise ValueError(f"{len(missing)} image ids have no region features (or pixels), "
                             f"e.g. {sorted(missing, key=str)[:5]}")
        used = {e.image_id for e in self.examples}
        #: "regions" or "pixels": what the items carry about the image
        self.visual = "pixels" if isinstance(regions, PixelImages) else "regions"
        self.regions: Mapping[Hashable, tuple[torch.Tensor, torch.Tensor]] = regions if self.visual == "pixels" else {
            k: (
                torch.as_tensor(np.asarray(f, dtype=np.float32)),
                torch.as_tensor(np.asarray(b, dtype=np.float32)),
            )
            for k, (f, b) in regions.items()
            if k in used
        }
        # tokenize each distinct question once (easy-VQA repeats many)
        unique = sorted({e.question for e in self.examples})
        enc = tokenizer(unique, truncation=True, max_length=max_text_len, add_special_tokens=True)["input_ids"] if unique else []
        by_text = {q: list(ids) for q, ids in zip(unique, enc)}
        #: token ids per question (lists of int), [CLS] ... [SEP]
        self.token_ids: list[list[int]] = [by_text[e.question] for e in self.examples]
        cls_id = getattr(tokenizer, "cls_token_id", None)
        if cls_id is not None and self.token_ids and self.token_ids[0][0] != cls_id:
            raise ValueError("the tokenizer did not add [CLS]")
        self.targets = torch.stack(
            [_score_vector(e.answers, self.answer_index, self.num_answers) for e in self.examples]
        ) if self.examples else torch.zeros(0, self.num_answers)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        e = self.examples[i]
        a, b = self.regions[e.image_id]
        names = ("pixel_values", "pixel_mask") if self.visual == "pixels" else ("img_feat", "img_pos")
        return {
            "input_ids": torch.tensor(self.token_ids[i], dtype=torch.int64),
            names[0]: a,
            names[1]: b,
            "targets": self.targets[i],
        }

    @property
    def question_types(self) -> list[str]:
        return [e.question_type for e in self.examples]


def collate(batch: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad and stack :class:`VQADataset` items.

    Returns exactly: ``input_ids`` (B, L) int64 padded with 0, ``attention_mask`` (B, L)
    int64 (1 on text tokens), ``img_feat`` (B, N, D) float32 and ``img_pos`` (B, N, 7)
    float32 padded with zeros, ``img_mask`` (B, N) int64 (1 on real regions), ``targets``
    (B, A) float32.  Pixel items give ``pixel_values`` (B, 3, H, W) float32 and ``pixel_mask``
    (B, H, W) int64 instead of ``img_feat``/``img_pos``/``img_mask``, images zero-padded at the
    bottom and right to the largest H and W (mask 0 there), as ViltImageProcessor pads.
    """
    if not batch:
        raise ValueError("empty batch")
    if "pixel_values" in batch[0]:
        return _collate_pixels(batch)
    B = len(batch)
    N = max(b["img_feat"].shape[0] for b in batch)
    D = batch[0]["img_feat"].shape[1]
    input_ids, attention_mask = _pad_text(batch)
    img_feat = torch.zeros((B, N, D), dtype=torch.float32)
    img_pos = torch.zeros((B, N, 7), dtype=torch.float32)
    img_mask = torch.zeros((B, N), dtype=torch.int64)
    for i, b in enumerate(batch):
        n = b["img_feat"].shape[0]
        img_feat[i, :n] = b["img_feat"]
        img_pos[i, :n] = b["img_pos"]
        img_mask[i, :n] = 1
    targets = torch.stack([b["targets"] for b in batch]).to(torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "img_feat": img_feat,
        "img_pos": img_pos,
        "img_mask": img_mask,
        "targets": targets,
    }


def _pad_text(batch: Sequence[Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), L), PAD_TOKEN_ID, dtype=torch.int64)
    attention_mask = torch.zeros((len(batch), L), dtype=torch.int64)
    for i, b in enumerate(batch):
        input_ids[i, : len(b["input_ids"])] = b["input_ids"]
        attention_mask[i, : len(b["input_ids"])] = 1
    return input_ids, attention_mask


def _collate_pixels(batch: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    H = max(b["pixel_values"].shape[1] for b in batch)
    W = max(b["pixel_values"].shape[2] for b in batch)
    pixel_values = torch.zeros((len(batch), 3, H, W), dtype=torch.float32)
    pixel_mask = torch.zeros((len(batch), H, W), dtype=torch.int64)
    for i, b in enumerate(batch):
        _, h, w = b["pixel_values"].shape
        pixel_values[i, :, :h, :w] = b["pixel_values"]
        pixel_mask[i, :h, :w] = b["pixel_mask"]
    input_ids, attention_mask = _pad_text(batch)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "pixel_mask": pixel_mask, "targets": torch.stack([b["targets"] for b in batch]).to(torch.float32)}


@dataclass
class TaskData:
    """A loaded task: datasets, answer vocabulary and what the model needs to know.

    ``feature_mean``/``feature_std`` are the train-split statistics used to standardise the
    region features (apply them to new images at inference time).  ``visual`` is "regions" or
    "pixels"; a pixel task has ``region_feature_dim`` None and ``image_processor`` the
    ViltImageProcessor settings (a dict) that made its pixels.
    """

    name: str
    train: VQADataset
    val: VQADataset
    test: VQADataset
    answers: list[str]
    region_feature_dim: int | None
    metric_name: str = "vqa_score"
    feature_mean: np.ndarray | None = field(default=None, repr=False)
    feature_std: np.ndarray | None = field(default=None, repr=False)
    visual: str = "regions"
    image_processor: dict | None = field(default=None, repr=False)
