"""What a lottery command starts from: a task's data and the model sized for it, both by name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vlsparse.data import collate, load_task
from vlsparse.models.heads import head_outputs
from vlsparse.models.registry import load_model, load_tokenizer, visual_input


def setup(model: str, task: str, seed: int, data_dir: str | Path | None = None) -> tuple[nn.Module, object, Callable]:
    """Load task ``task``'s data and the model ``model`` with a fresh head sized for it.

    Args:
        model: preset name, save_pretrained directory, or official UNITER / LXMERT checkpoint file.
        task: task name (:data:`vlsparse.data.TASKS`).
        seed: seeds torch, the head's initialisation (φ0), and the task's validation split (tasks that carve
            one from train) and sampled negatives (:class:`vlsparse.data.options.LoadOptions`).
        data_dir: directory of the task's data files (tasks other than easy-VQA need one).

    Returns:
        (model, task data (a TaskData), collate).

    Raises:
        ValueError / FileNotFoundError / KeyError: unknown model or task, missing or unreadable files
            (raised by :func:`vlsparse.data.load_task` and :func:`vlsparse.models.registry.load_model`).
    """
    torch.manual_seed(seed)
    data = load_task(task, load_tokenizer(model), data_dir=data_dir, visual=visual_input(model), seed=seed)
    obj = data.objective
    net, _ = load_model(model, img_dim=data.region_feature_dim, num_answers=head_outputs(obj.head, len(data.answers)),
                        seed=seed, head=obj.head, num_images=obj.images)
    return net, data, collate


__all__ = ["setup"]
