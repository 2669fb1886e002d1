"""A pre-training corpus: captions with their images' region features, split into training and held-out.

:func:`load_corpus` reads ``easy-vqa-captions`` (built and cached, :mod:`vlsparse.data.captions`) or a COCO
captions file with region features from ``--data-dir`` (the readers of every other task:
:func:`vlsparse.data.formats.visual_inputs`). Items of :class:`CaptionSet` carry what UNITER's pre-training
objectives need (:mod:`vlsparse.training.objectives`): the caption's tokens with their word numbers
(whole-word masking), the image's regions and a negative image's regions (image-text matching).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlsparse.data import formats
from vlsparse.data.captions import caption_facts, contradicting_images, easy_vqa_captions, read_coco_captions
from vlsparse.data.dataset import _pad_stack
from vlsparse.data.options import TEXT_LEN, LoadOptions
from vlsparse.data.visual.regions import REGION_FEATURE_DIM, default_cache_dir

__all__ = ["CORPORA", "CaptionCorpus", "CaptionSet", "collate_captions", "load_corpus", "HELDOUT_FRACTION"]

#: the embedded corpora (any other --corpus is a COCO captions file)
CORPORA = ("easy-vqa-captions",)
#: fraction of the corpus images whose captions are held out for the before/after metrics
HELDOUT_FRACTION = 0.05
_HELDOUT_SEED = 1234


class CaptionSet(Dataset):
    """(caption, image) pairs as pre-training items.

    Args:
        captions: (text, image key) pairs.
        regions: image key -> (features (N, D) float32, boxes (N, 7) float32).
        facts: image key -> known facts (``{"color": "red"}``), for contradicting ITM negatives.
        tokenizer: a fast BERT tokenizer (``word_ids`` gives whole words).
        max_text_len: tokens per caption, [CLS] and [SEP] included.
        seed: seed of the negative draws (one new draw per item access, reproducible in access order).
        negatives_from: the images negatives are drawn from (default: those of ``captions``; the held-out set
            draws from the whole corpus, its few images may not contradict each other).

    Items: ``input_ids`` (L,) int64, ``attention_mask`` (L,) int64, ``word_index`` (L,) int64 (1 + the word
    number of each token, 0 for [CLS]/[SEP]), ``img_feat`` (N, D) float32, ``img_pos`` (N, 7) float32,
    ``img_mask`` (N,) int64, and ``neg_feat``, ``neg_pos``, ``neg_mask`` of an image whose facts contradict
    the caption (any other image when none is known). Batch them with :func:`collate_captions`.

    Raises:
        ValueError: a caption whose image has no region features (names it), or a caption with no
            possible negative image.
    """

    def __init__(self, captions: Sequence[tuple[str, Hashable]], regions: Mapping, facts: Mapping[Hashable, dict],
                 tokenizer: Any, max_text_len: int = TEXT_LEN, seed: int = 0,
                 negatives_from: Sequence[Hashable] | None = None):
        self.captions = list(captions)
        missing = sorted({str(k) for _, k in self.captions if k not in regions})
        if missing:
            raise ValueError(f"{len(missing)} caption images have no region features, e.g. {', '.join(missing[:3])}")
        self.regions, self.rng = regions, np.random.default_rng(seed)
        texts = [c for c, _ in self.captions]
        enc = tokenizer(texts, truncation=True, max_length=max_text_len) if texts else None
        self.token_ids = [list(ids) for ids in enc["input_ids"]] if enc else []
        self.word_index = [[0 if w is None else w + 1 for w in enc.word_ids(i)] for i in range(len(texts))]
        keys = sorted({k for _, k in self.captions} if negatives_from is None else set(negatives_from), key=str)
        known = {k: dict(facts.get(k, {})) for k in keys}
        values: dict[str, set[str]] = {}
        for f in known.values():
            for k, v in f.items():
                values.setdefault(k, set()).add(v)
        pools: dict[tuple, list] = {}
        self.negatives = []
        for text, key in self.captions:
            stated = tuple(sorted(caption_facts(text, values).items()))
            if stated not in pools:
                pools[stated] = [k for k in contradicting_images(dict(stated), known)]
            pool = pools[stated] if stated else [k for k in keys if k != key]
            if not pool:
                raise ValueError(f"caption {text!r}: no image contradicts it, so image-text matching has no negative")
            self.negatives.append(pool)

    def __len__(self) -> int:
        return len(self.captions)

    def used_token_ids(self) -> set[int]:
        """Every token id of every caption."""
        return {t for ids in self.token_ids for t in ids}

    def _image(self, key: Hashable, prefix: str) -> dict[str, torch.Tensor]:
        feat, boxes = self.regions[key]
        f = torch.as_tensor(np.asarray(feat, dtype=np.float32))
        return {f"{prefix}_feat": f, f"{prefix}_pos": torch.as_tensor(np.asarray(boxes, dtype=np.float32)),
                f"{prefix}_mask": torch.ones(len(f), dtype=torch.int64)}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.token_ids[i], dtype=torch.int64)
        pool = self.negatives[i]
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "word_index": torch.tensor(self.word_index[i], dtype=torch.int64)}
        item.update(self._image(self.captions[i][1], "img"))
        item.update(self._image(pool[int(self.rng.integers(len(pool)))], "neg"))
        return item


def collate_captions(batch: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack :class:`CaptionSet` items, zero-padded at the end of each axis (B leading)."""
    if not batch:
        raise ValueError("empty batch")
    return {k: _pad_stack([b[k] for b in batch]) for k in batch[0]}


@dataclass
class CaptionCorpus:
    """A loaded corpus: ``train`` and ``heldout`` :class:`CaptionSet` (disjoint images), the region feature size,
    and how many images and captions it has (``stats``: images, captions, words, vocabulary)."""

    name: str
    train: CaptionSet
    heldout: CaptionSet
    region_feature_dim: int
    stats: dict = field(default_factory=dict)


def _easy_vqa(options: LoadOptions) -> tuple[Path, Mapping]:
    from vlsparse.data.easy_vqa import easy_vqa_regions, easy_vqa_train_split

    train, _ = easy_vqa_train_split(options)
    root = Path(options.cache_dir).expanduser() if options.cache_dir is not None else default_cache_dir()
    # v2: facts of easy_facts.facts_from_questions (v1 missed the colours known only by elimination)
    path = root / "corpora" / f"easy-vqa-captions-v2-val{options.val_fraction:g}-seed{options.seed}.json"
    if not path.is_file():
        easy_vqa_captions(path, train)
    regions = easy_vqa_regions(options, train)[0]
    return path, regions


def load_corpus(corpus: str, tokenizer: Any, options: LoadOptions = LoadOptions()) -> CaptionCorpus:
    """Load a pre-training corpus by name or file.

    Args:
        corpus: ``easy-vqa-captions`` (built from the easy-VQA train split of ``options.seed`` and
            ``options.val_fraction``, cached in ``<cache>/corpora/``; region features standardised as the
            easy-VQA task standardises them) or a COCO captions JSON file whose images are keyed by their
            ``file_name`` stem in ``options.data_dir/features`` (default: the file's directory).
        tokenizer: a fast BERT tokenizer.
        options: data_dir, cache_dir, max_text_len, seed (negatives), val_fraction, seed (easy-VQA split).

    Raises:
        FileNotFoundError: a missing corpus file or features directory (names it).
        ValueError: an unknown corpus name that is no file, a file not in the COCO captions format, captions
            whose image has no region features (names the file / images).
    """
    options = options.with_defaults()
    if corpus in CORPORA:
        path, regions = _easy_vqa(options)
        images, captions = read_coco_captions(path)
        key_of = {i: i for i in images}
    else:
        path = Path(corpus)
        if not path.is_file():
            raise FileNotFoundError(f"--corpus {corpus}: neither {', '.join(CORPORA)} nor a COCO captions file")
        images, captions = read_coco_captions(path)
        key_of = {i: Path(im["file_name"]).stem for i, im in images.items()}
        root = formats.data_root(options.data_dir or path.parent, "pretrain")
        try:
            regions = formats.visual_inputs(root, set(key_of.values()), options)[0]
        except FileNotFoundError as exc:
            raise ValueError(f"--corpus {path}: captions whose image has no region features ({exc})") from None
    facts = {key_of[i]: im["facts"] for i, im in images.items()}
    captions = [(c, key_of[i]) for c, i in captions]
    keys = sorted({k for _, k in captions}, key=str)
    perm = np.random.default_rng(_HELDOUT_SEED).permutation(len(keys))
    held = {keys[i] for i in perm[:max(1, int(round(HELDOUT_FRACTION * len(keys))))]} if len(keys) > 1 else set()
    sets = [CaptionSet([c for c in captions if (c[1] in held) == h], regions, facts, tokenizer,
                       options.max_text_len, options.seed + h, keys) for h in (False, True)]
    dim = int(np.asarray(regions[keys[0]][0]).shape[1]) if corpus not in CORPORA else REGION_FEATURE_DIM
    words = [w for c, _ in captions for w in c.lower().split()]
    stats = {"images": len(keys), "captions": len(captions), "heldout_images": len(held), "words": len(words),
             "vocabulary": sorted(set(words)), "file": str(path)}
    return CaptionCorpus(corpus if corpus in CORPORA else str(path), sets[0], sets[1], dim, stats)
