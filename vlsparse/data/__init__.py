"""Data: region features, datasets of every task and the task registry.

``load_task(name, tokenizer, ...)`` returns a :class:`TaskData`.  To add a task, write a
loader ``fn(tokenizer, options: LoadOptions, **task_keywords) -> TaskData`` and add it to :data:`TASKS`;
:class:`~vlsparse.data.options.LoadOptions` holds what every loader is told (data_dir, cache_dir, visual,
max_text_len, image_size, val_fraction, seed).  The tasks of Gan et al. 2022 (Tables 1-4) and their on-disk formats:

=============  ===================================  =======================  ====================
task           module (files read from --data-dir)  head / metric            source format
=============  ===================================  =======================  ====================
easy-vqa       easy_vqa (the easy_vqa package)      answer / vqa_score       easy-VQA (PyPI)
vqa            vqav2                                answer / vqa_score       VQA v2 JSON
gqa            gqa                                  answer / accuracy        GQA balanced JSON
vcr            vcr                                  rank / q_ar_accuracy     VCR jsonl
nlvr2          nlvr2                                pair / accuracy          NLVR2 jsonl
snli-ve        snli_ve                              answer / accuracy        SNLI-VE jsonl
refcoco+       refcoco                              region / accuracy        refer refs + COCO
flickr30k      flickr30k                            rank / ir_r1 (R@1/5/10)  Karpathy split JSON
easy-nlvr2     easy_nlvr2 (built from easy-VQA)     pair / accuracy          NLVR2 jsonl
easy-retrieval easy_retrieval (built from easy-VQA) rank / ir_r1, facts      Karpathy split JSON
=============  ===================================  =======================  ====================

The last two are derived from easy-VQA's images and split (:mod:`vlsparse.data.easy_derived`), written in the
mirrored task's format into the cache and read by its loader.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

from vlsparse.atomic import write_json
from vlsparse.data.options import LoadOptions
from vlsparse.data.visual.regions import EXTRACTOR_VERSION

__all__ = ["TASKS", "load_task", "task_info", "save_task_info", "LoadOptions", "TaskData", "VLDataset", "VLExample",
           "collate", "vqa_score"]


def __getattr__(name: str):
    # .dataset imports torch: load it on first use, so that vlsparse.data.visual.regions (the torch-free app
    # runtime, vlsparse.Pipeline on ONNX bundles) imports without torch.
    if name in ("TaskData", "VLDataset", "VLExample", "collate", "vqa_score"):
        from vlsparse.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lazy(module: str, function: str) -> Callable[..., TaskData]:
    # The loader modules import torch: each is imported when its task is loaded, not with this package,
    # so that the registry (and vlsparse.data.visual.regions, under it) imports without torch.
    def load(tokenizer: Any, options: LoadOptions, **kw: Any) -> TaskData:
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)(tokenizer, options, **kw)

    load.__doc__ = f"vlsparse.data.{module}.{function}"
    return load


#: task name -> loader(tokenizer, options: LoadOptions, **task_keywords) -> TaskData
TASKS: dict[str, Callable[..., TaskData]] = {
    "easy-vqa": _lazy("easy_vqa", "load_easy_vqa"),
    "vqa": _lazy("vqav2", "load_vqa"),
    "gqa": _lazy("gqa", "load_gqa"),
    "vcr": _lazy("vcr", "load_vcr"),
    "nlvr2": _lazy("nlvr2", "load_nlvr2"),
    "snli-ve": _lazy("snli_ve", "load_snli_ve"),
    "refcoco+": _lazy("refcoco", "load_refcoco_plus"),
    "flickr30k": _lazy("flickr30k", "load_flickr30k"),
    "easy-nlvr2": _lazy("easy_nlvr2", "load_easy_nlvr2"),
    "easy-retrieval": _lazy("easy_retrieval", "load_easy_retrieval"),
}


def load_task(
    name: str,
    tokenizer: Any,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    visual: str = "regions",
    **kw: Any,
) -> TaskData:
    """Load a registered task.  ``data_dir``, ``cache_dir``, ``visual`` and the other
    :class:`~vlsparse.data.options.LoadOptions` fields in ``kw`` (``max_text_len``, ``image_size``,
    ``val_fraction``, ``seed``) become the loader's options; the rest of ``kw`` goes to the loader as its
    task-specific keywords (e.g. ``negatives`` of flickr30k).  ``visual``: "regions" (region features +
    boxes, UNITER/LXMERT) or "pixels" (images through ViltImageProcessor, ViLT); see
    ``vlsparse.models.visual_input``.

    Raises:
        ValueError: unknown name or ``visual`` (listing the known ones).
        TypeError: a keyword that is neither an option nor one of the task's own (naming it).
    """
    try:
        loader = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
    options, task_keywords = LoadOptions.from_keywords(data_dir=data_dir, cache_dir=cache_dir, visual=visual, **kw)
    return loader(tokenizer, options, **task_keywords)


def task_info(task: TaskData) -> dict:
    """What inference needs to know about a task, as JSON-able data: name, answers (index = logit
    position), metric, objective (head, loss, metric, groups, images), region feature size, region
    extractor version, and the train-split feature mean/std (lists of floats, length D) used to
    standardise region features; ``visual`` ("regions" | "pixels") and, for pixels, the
    ViltImageProcessor settings (``image_processor``)."""
    return {"task": task.name, "answers": list(task.answers), "metric": task.metric_name,
            "objective": task.objective.to_dict(),
            "region_feature_dim": task.region_feature_dim,
            "region_extractor": EXTRACTOR_VERSION if task.feature_mean is not None else None,
            "max_text_len": getattr(task.train, "max_text_len", None),
            "feature_mean": None if task.feature_mean is None else [float(x) for x in task.feature_mean],
            "feature_std": None if task.feature_std is None else [float(x) for x in task.feature_std],
            "visual": getattr(task, "visual", "regions"), "image_processor": getattr(task, "image_processor", None)}


def save_task_info(task: TaskData, path: str | os.PathLike) -> None:
    """Atomically write :func:`task_info` as JSON to ``path`` (e.g. RUN/task.json)."""
    write_json(path, task_info(task))
