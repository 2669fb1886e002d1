"""Shared fixtures: a tiny synthetic VQA task and the tiny UNITER preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlsparse.data.dataset import TaskData, VLDataset, VLExample
from vlsparse.models import default_tokenizer, load_model

IMG_DIM = 12
ANSWERS = ["yes", "no", "red", "blue"]


def _split(rng: np.random.Generator, n_images: int, n_questions: int, offset: int):
    regions = {offset + i: (rng.standard_normal((3, IMG_DIM)).astype(np.float32),
                            rng.random((3, 7)).astype(np.float32)) for i in range(n_images)}
    qs = ["is it red?", "what color is the shape?", "is there a blue circle?", "what is the color?"]
    examples = [VLExample(qs[j % 4], offset + j % n_images, {ANSWERS[(j * 7) % 4]: 1.0}) for j in range(n_questions)]
    return examples, regions


@pytest.fixture(scope="session")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="session")
def tiny_task(tokenizer) -> TaskData:
    """A 48/16/16-question task over random region features (3 regions of dim 12), 4 answers."""
    rng = np.random.default_rng(0)
    parts = [_split(rng, 8, n, off) for n, off in ((48, 0), (16, 100), (16, 200))]
    ds = [VLDataset(ex, reg, tokenizer, ANSWERS, max_text_len=12) for ex, reg in parts]
    return TaskData("tiny", ds[0], ds[1], ds[2], ANSWERS, IMG_DIM)


@pytest.fixture
def tiny_model():
    model, _ = load_model("uniter-tiny", img_dim=IMG_DIM, num_answers=len(ANSWERS), seed=0)
    return model


@pytest.fixture
def batch(tiny_task):
    from vlsparse.data import collate

    b = collate([tiny_task.train[i] for i in range(5)])
    b.pop("targets")
    return b


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
