"""Datasets of every task: examples, soft answer targets, a torch Dataset, its collate, retrieval sets.

Every task is framed VQA-style, as a choice among outputs (:mod:`vlsparse.data.objective`): a
:class:`VLExample` holds one text or C candidate texts, one image or K images, and soft scores of
its labels (or the referred box, for region tasks).

Conventions (VQA v2, as used by UNITER and LXMERT fine-tuning):

* Every question has up to 10 human answers.  An answer given by ``count`` annotators gets the
  official soft score 0, 0.3, 0.6, 0.9, 1.0 for 0, 1, 2, 3, >= 4 annotators (:func:`soft_score`): the
  mean over the 10 leave-one-annotator-out subsets of ``min(#matches / 3, 1)`` (the VQA evaluation
  script; Antol et al., ICCV 2015; Goyal et al., CVPR 2017), the values of the target files that
  UNITER and LXMERT inherit from bottom-up-attention-vqa (Anderson et al., 2018).  For single-answer
  data such as easy-VQA the given answer scores 1.
* The model is trained on the soft target vector (binary cross-entropy per answer) and
  evaluated with the "VQA score": the target score of the arg-max answer, averaged over
  questions (``compute_score_with_logits`` in the UNITER/LXMERT/bottom-up trainers).

Batches (see :func:`collate`) hold ``input_ids``, ``attention_mask``, ``img_feat``, ``img_pos``,
``img_mask`` and ``targets`` (region features, ``visual="regions"``), or ``input_ids``,
``attention_mask``, ``pixel_values``, ``pixel_mask`` and ``targets`` (image pixels for ViLT,
``visual="pixels"``, see :mod:`vlsparse.data.visual.pixels`; plus ``img_pos``/``img_mask`` candidate boxes
for a region task), with extra candidate (C) or image (K) axes as :class:`VLDataset` describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vlsparse.data.metrics import box_iou, recall_at_k, vqa_score
from vlsparse.data.objective import VQA_OBJECTIVE, Objective
from vlsparse.data.visual.pixels import PixelImages

__all__ = [
    "PAD_TOKEN_ID",
    "soft_score",
    "answer_targets",
    "vqa_score",
    "VLExample",
    "VLDataset",
    "collate",
    "RetrievalSet",
    "split_by_image",
    "region_feature_stats",
    "standardize_regions",
    "TaskData",
]

#: Text padding id (BERT's [PAD]).
PAD_TOKEN_ID = 0

#: official VQA soft scores of an answer given by 0, 1, 2, 3 annotators (4 or more: 1.0)
_SOFT_SCORES = (0.0, 0.3, 0.6, 0.9)


def soft_score(count: int) -> float:
    """Official VQA v2 soft score of an answer given by ``count`` of 10 annotators: 0.3, 0.6, 0.9 for
    1, 2, 3 and 1.0 for 4 or more (0 for none).  It is the mean over the 10 leave-one-out subsets of 9
    annotators of ``min(#matches / 3, 1)``: for count 2, (2 * 1/3 + 8 * 2/3) / 10 = 0.6.

    Raises:
        ValueError: ``count`` < 0.
    """
    if count < 0:
        raise ValueError(f"negative annotator count {count}")
    return _SOFT_SCORES[count] if count < len(_SOFT_SCORES) else 1.0


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


@dataclass
class VLExample:
    """One example of any task, framed as a choice among outputs (see :mod:`vlsparse.data.objective`).

    Args:
        question: the text (question, statement, hypothesis, caption, referring expression), or a
            tuple of C candidate texts scored one by one (VCR: question + each answer / rationale).
        image_id: the image's key in the dataset's region features or pixels, or a tuple of K keys
            (NLVR2's two images; a caption's positive and negative images for ITM training).
        answers: label -> soft score (``soft_score``-ed), labels indexed by the answer vocabulary
            (VQA answers, GQA answers, "entailment", "True", "choice_2", ...). Empty for region tasks.
        question_type: an optional free-form tag for per-type reports ("" if unknown).
        gt_box: region tasks (RefCOCO+): the referred object's box (x1, y1, x2, y2) normalised to
            [0, 1]; the targets are then the IoU of each region's box with it.
    """

    question: str | tuple[str, ...]
    image_id: Hashable
    answers: dict[str, float]
    question_type: str = ""
    gt_box: tuple[float, float, float, float] | None = None

    @property
    def texts(self) -> tuple[str, ...]:
        return self.question if isinstance(self.question, tuple) else (self.question,)

    @property
    def images(self) -> tuple:
        return self.image_id if isinstance(self.image_id, tuple) else (self.image_id,)


def split_by_image(
    examples: Sequence[VLExample], val_fraction: float, seed: int = 0
) -> tuple[list[VLExample], list[VLExample]]:
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


class VLDataset(Dataset):
    """Examples + region features (or image pixels) -> model inputs and targets, for every task.

    Args:
        examples: the examples (:class:`VLExample`).
        regions: image_id -> ``(features (N, D) float32, boxes (N, 7) float32)`` (standardised when the
            task standardises, see :func:`standardize_regions`; a lazy store such as
            :func:`vlsparse.data.visual.features.open_region_features` is read one image at a time); or a
            :class:`~vlsparse.data.visual.pixels.PixelImages` (``visual`` is then "pixels"). Every example's
            images must be in it.
        tokenizer: a BERT-style tokenizer (e.g. ``BertTokenizerFast``) that adds ``[CLS] ... [SEP]``.
        answer_vocab: list of labels (index = logit position) or dict label -> index.
        max_text_len: texts are truncated to this many tokens, [CLS] and [SEP] included.
        objective: the task's head, loss and metric (default: VQA).
        boxes: region tasks on pixels (ViLT): image_id -> candidate boxes (N, 7) float32.

    Items are dicts of tensors: ``input_ids`` and ``attention_mask`` (L,) int64, or (C, L) for C
    candidate texts; ``img_feat`` (N, D) float32, ``img_pos`` (N, 7) float32 and ``img_mask`` (N,) int64,
    or ``pixel_values`` (3, H, W) float32 and ``pixel_mask`` (H, W) int64 (plus ``img_pos``/``img_mask``
    of the candidate boxes for a region task), each with a leading K axis for K images per example;
    ``targets`` (A,) float32 soft scores, or (N,) float32 IoUs for a region task. Batch them with
    :func:`collate`.

    Raises:
        ValueError: an example whose image is missing, a tokenizer that adds no [CLS], a bad length.
    """

    def __init__(
        self,
        examples: Sequence[VLExample],
        regions: Mapping[Hashable, tuple[np.ndarray, np.ndarray]],
        tokenizer: Any,
        answer_vocab: Sequence[str] | Mapping[str, int],
        max_text_len: int = 40,
        objective: Objective = VQA_OBJECTIVE,
        boxes: Mapping[Hashable, np.ndarray] | None = None,
    ):
        if max_text_len < 2:
            raise ValueError("max_text_len must leave room for [CLS] and [SEP]")
        self.examples = list(examples)
        self.objective = objective
        self.answer_index = _vocab_index(answer_vocab)
        self.num_answers = (max(self.answer_index.values()) + 1) if self.answer_index else 0
        self.max_text_len = max_text_len
        #: "regions" or "pixels": what the items carry about the image
        self.visual = "pixels" if isinstance(regions, PixelImages) else "regions"
        self.regions = regions
        self.boxes = boxes
        if objective.head == "region" and self.visual == "pixels" and boxes is None:
            raise ValueError("a region task on pixels needs the candidate boxes (boxes=)")
        used = {i for e in self.examples for i in e.images}
        missing = [i for i in used if i not in regions or (boxes is not None and i not in boxes)]
        if missing:
            raise ValueError(f"{len(missing)} image ids have no region features (or pixels), "
                             f"e.g. {sorted(missing, key=str)[:5]}")
        # tokenize each distinct text once (easy-VQA repeats many)
        unique = sorted({t for e in self.examples for t in e.texts})
        enc = tokenizer(unique, truncation=True, max_length=max_text_len, add_special_tokens=True)["input_ids"] if unique else []
        by_text = {q: list(ids) for q, ids in zip(unique, enc)}
        #: token ids per example: one list of int per text, [CLS] ... [SEP]
        self.token_ids: list[list[list[int]]] = [[by_text[t] for t in e.texts] for e in self.examples]
        cls_id = getattr(tokenizer, "cls_token_id", None)
        if cls_id is not None and self.token_ids and self.token_ids[0][0][0] != cls_id:
            raise ValueError("the tokenizer did not add [CLS]")

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def targets(self) -> torch.Tensor:
        """(Q, A) float32 soft targets of every example (built on demand: items build their own row,
        so a data set with many questions and answers never holds the dense matrix).

        Raises:
            ValueError: a region task, whose targets depend on each image's boxes.
        """
        if self.objective.head == "region":
            raise ValueError("region tasks have per-item IoU targets; read them from the items")
        if not self.examples:
            return torch.zeros(0, self.num_answers)
        return torch.stack([_score_vector(e.answers, self.answer_index, self.num_answers) for e in self.examples])

    def used_token_ids(self) -> set[int]:
        """Every token id of every text of the data set."""
        return {t for texts in self.token_ids for ids in texts for t in ids}

    def _image(self, key: Hashable) -> dict[str, torch.Tensor]:
        a, b = self.regions[key]
        if self.visual == "pixels":
            item = {"pixel_values": a, "pixel_mask": b}
            if self.boxes is not None:
                pos = torch.as_tensor(np.asarray(self.boxes[key], dtype=np.float32))
                item.update(img_pos=pos, img_mask=torch.ones(len(pos), dtype=torch.int64))
            return item
        f = torch.as_tensor(np.asarray(a, dtype=np.float32))
        return {"img_feat": f, "img_pos": torch.as_tensor(np.asarray(b, dtype=np.float32)),
                "img_mask": torch.ones(len(f), dtype=torch.int64)}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        e = self.examples[i]
        texts = [torch.tensor(ids, dtype=torch.int64) for ids in self.token_ids[i]]
        several = isinstance(e.question, tuple)
        item = {"input_ids": _pad_stack(texts) if several else texts[0],
                "attention_mask": _pad_stack([torch.ones_like(t) for t in texts]) if several else torch.ones_like(texts[0])}
        images = [self._image(k) for k in e.images]
        item.update({k: _pad_stack([im[k] for im in images]) for k in images[0]} if isinstance(e.image_id, tuple)
                    else images[0])
        if self.objective.head == "region":
            box = np.asarray(e.gt_box, dtype=np.float64)[None]
            item["targets"] = torch.as_tensor(box_iou(item["img_pos"].numpy(), box)[:, 0], dtype=torch.float32)
        else:
            item["targets"] = _score_vector(e.answers, self.answer_index, self.num_answers)
        return item

    @property
    def question_types(self) -> list[str]:
        return [e.question_type for e in self.examples]


class RetrievalSet:
    """A caption x image retrieval evaluation set (Flickr30k val/test, Karpathy split; UNITER ``itm_eval``).

    Every caption is scored against every image with the model's ``rank`` head (one forward per
    pair); :meth:`evaluate` returns IR and TR recall@1/5/10 (:func:`vlsparse.data.metrics.recall_at_k`).

    Args:
        captions: (caption text, its image id) pairs.
        regions, tokenizer, max_text_len: as :class:`VLDataset`.
        image_groups: image id -> a hashable group (easy-retrieval: the image's facts); retrieving any image
            (or caption) of the query's group then counts as correct (``recall_at_k``'s ``image_class``).
            None: only the query's own image (captions) counts.

    Raises:
        ValueError: a caption whose image is missing.
    """

    objective = Objective(head="rank", loss="ce", metric="ir_r1")

    def __init__(self, captions: Sequence[tuple[str, Hashable]], regions: Mapping, tokenizer: Any,
                 max_text_len: int = 40, image_groups: Mapping[Hashable, Hashable] | None = None):
        self.image_ids = sorted({img for _, img in captions}, key=str)
        index = {img: k for k, img in enumerate(self.image_ids)}
        self.caption_image = [index[img] for _, img in captions]
        #: (I,) group number of each image (first-seen order), or None: each image its own group
        self.image_class = None
        if image_groups is not None:
            numbers: dict[Hashable, int] = {}
            self.image_class = [numbers.setdefault(image_groups[img], len(numbers)) for img in self.image_ids]
        self.texts = VLDataset([VLExample(c, img, {}) for c, img in captions], regions, tokenizer, [],
                                max_text_len, self.objective)
        self.images = VLDataset([VLExample("", img, {}) for img in self.image_ids], regions, tokenizer, [],
                                 max_text_len, self.objective)

    def __len__(self) -> int:
        return len(self.caption_image)

    def used_token_ids(self) -> set[int]:
        """Every token id of the captions."""
        return self.texts.used_token_ids()

    @torch.no_grad()
    def score_matrix(self, model: Any, batch_size: int = 256, device: str = "cpu",
                     rows: range | None = None) -> np.ndarray:
        """(captions, images) float64 scores of the model's rank head. The images are batched once
        (``batch_size`` per batch, kept on ``device``); each caption is then scored against every batch.
        ``rows``: only these captions (a range; the result is (len(rows), images)), e.g. one process's share."""
        model.to(device).eval()
        rows = range(len(self.texts)) if rows is None else rows
        n = len(self.images)
        chunks = []
        for s in range(0, n, batch_size):
            batch = collate([self.images[k] for k in range(s, min(s + batch_size, n))])
            chunks.append({k: v.to(device) for k, v in batch.items() if k not in ("input_ids", "attention_mask", "targets")})
        scores = np.zeros((len(rows), n))
        for i, t in enumerate(rows):
            text = self.texts[t]
            start = 0
            for chunk in chunks:
                m = next(iter(chunk.values())).shape[0]
                ids = text["input_ids"].to(device).expand(m, -1)
                out = model(input_ids=ids, attention_mask=text["attention_mask"].to(device).expand(m, -1), **chunk)
                scores[i, start:start + m] = out.reshape(-1).double().cpu().numpy()
                start += m
        return scores

    def metrics(self, scores: np.ndarray) -> dict[str, float]:
        """``{"ir_r1", "tr_r1", "ir_r5", "tr_r5", "ir_r10", "tr_r10", "n"}`` (fractions; n = captions) of a
        (captions, images) score matrix."""
        return {**recall_at_k(scores, self.caption_image, image_class=self.image_class), "n": len(self)}

    def evaluate(self, model: Any, batch_size: int = 256, device: str = "cpu") -> dict[str, float]:
        """:meth:`metrics` of :meth:`score_matrix` (fractions; n = captions)."""
        return self.metrics(self.score_matrix(model, batch_size, device))


#: key order of a batch
_KEYS = ("input_ids", "attention_mask", "img_feat", "img_pos", "img_mask", "pixel_values", "pixel_mask", "targets")


def _pad_stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack tensors of the same rank, zero-padded at the end of every axis to the largest size."""
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    out = torch.zeros((len(tensors), *shape), dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[(i, *(slice(0, n) for n in t.shape))] = t
    return out


def collate(batch: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad and stack :class:`VLDataset` items: every tensor is zero-padded at the end of each axis to
    the largest size in the batch, so masks are 0 and ids are [PAD] (0) on padding.

    Returns the items' keys in the order ``input_ids``, ``attention_mask``, ``img_feat``, ``img_pos``,
    ``img_mask``, ``pixel_values``, ``pixel_mask``, ``targets``, each with a leading batch axis B: e.g.
    ``input_ids`` (B, L) int64, ``img_feat`` (B, N, D) float32, ``img_mask`` (B, N) int64, ``targets``
    (B, A) float32. Pixel images are padded at the bottom and right (mask 0 there), as
    ViltImageProcessor pads.

    Raises:
        ValueError: an empty batch, or items with different keys.
    """
    if not batch:
        raise ValueError("empty batch")
    keys = [k for k in _KEYS if k in batch[0]]
    if any(set(b) != set(keys) for b in batch):
        raise ValueError(f"items have different keys; expected {keys}")
    return {k: _pad_stack([b[k] for b in batch]) for k in keys}


@dataclass
class TaskData:
    """A loaded task: datasets, answer vocabulary and what the model needs to know.

    ``feature_mean``/``feature_std`` are the train-split statistics used to standardise the
    region features (apply them to new images at inference time).  ``visual`` is "regions" or
    "pixels"; a pixel task has ``region_feature_dim`` None and ``image_processor`` the
    ViltImageProcessor settings (a dict) that made its pixels.
    """

    name: str
    train: VLDataset
    val: VLDataset
    test: VLDataset
    answers: list[str]
    region_feature_dim: int | None
    metric_name: str = "vqa_score"
    feature_mean: np.ndarray | None = field(default=None, repr=False)
    feature_std: np.ndarray | None = field(default=None, repr=False)
    visual: str = "regions"
    image_processor: dict | None = field(default=None, repr=False)
    objective: Objective = VQA_OBJECTIVE
