"""Data: region features, VQA-style datasets and the task registry.

``load_task(name, tokenizer, ...)`` returns a :class:`TaskData`.  To add a task, write a
loader ``fn(tokenizer, data_dir=None, cache_dir=None, **kw) -> TaskData`` and add it to
:data:`TASKS`.
"""

from __future__ import annotations

import os
from typing import Any, Callable

__all__ = ["TASKS", "load_task", "task_info", "save_task_info", "TaskData", "VQADataset", "VQAExample", "collate", "vqa_score"]


def __getattr__(name: str):
    # .vqa imports torch: load it on first use, so that vlsparse.data.regions (the torch-free app
    # runtime, vlsparse.Pipeline on ONNX bundles) imports without torch.
    if name in ("TaskData", "VQADataset", "VQAExample", "collate", "vqa_score"):
        from . import vqa

        return getattr(vqa, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _easy_vqa(tokenizer: Any, data_dir: str | os.PathLike | None = None, cache_dir=None, **kw) -> TaskData:
    # easy-VQA ships its data in the `easy_vqa` package: data_dir is not used.
    from .easy_vqa import load_easy_vqa

    return load_easy_vqa(tokenizer, cache_dir=cache_dir, **kw)


#: task name -> loader(tokenizer, data_dir=None, cache_dir=None, visual="regions", **kw) -> TaskData
TASKS: dict[str, Callable[..., TaskData]] = {
    "easy-vqa": _easy_vqa,
}


def load_task(
    name: str,
    tokenizer: Any,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    visual: str = "regions",
    **kw: Any,
) -> TaskData:
    """Load a registered task; ``kw`` goes to its loader (e.g. ``val_fraction``, ``seed``,
    ``max_text_len``).  ``visual``: "regions" (region features + boxes, UNITER/LXMERT) or
    "pixels" (images through ViltImageProcessor, ViLT); see ``vlsparse.models.visual_input``.
    Unknown name or ``visual`` -> ValueError listing the known ones."""
    from .vqa import VISUALS

    try:
        loader = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
    if visual not in VISUALS:
        raise ValueError(f"visual must be one of {', '.join(VISUALS)}, got {visual!r}")
    return loader(tokenizer, data_dir=data_dir, cache_dir=cache_dir, visual=visual, **kw)


def task_info(task: TaskData) -> dict:
    """What inference needs to know about a task, as JSON-able data: name, answers (index = logit
    position), metric, region feature size, region extractor version, and the train-split
    feature mean/std (lists of floats, length D) used to standardise region features; ``visual``
    ("regions" | "pixels") and, for pixels, the ViltImageProcessor settings (``image_processor``)."""
    from .regions import EXTRACTOR_VERSION

    return {"task": task.name, "answers": list(task.answers), "metric": task.metric_name,
            "region_feature_dim": task.region_feature_dim, "region_extractor": EXTRACTOR_VERSION,
            "max_text_len": getattr(task.train, "max_text_len", None),
            "feature_mean": None if task.feature_mean is None else [float(x) for x in task.feature_mean],
            "feature_std": None if task.feature_std is None else [float(x) for x in task.feature_std],
            "visual": getattr(task, "visual", "regions"), "image_processor": getattr(task, "image_processor", None)}


def save_task_info(task: TaskData, path: str | os.PathLike) -> None:
    """Atomically write :func:`task_info` as JSON to ``path`` (e.g. RUN/task.json)."""
    from ..io import write_json

    write_json(path, task_info(task))
