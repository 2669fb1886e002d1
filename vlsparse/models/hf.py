"""What LXMERT and ViLT share: reading transformers ``save_pretrained`` directories and fitting a
checkpoint to a task (new answer head when the answer vocabulary differs).

Both wrappers subclass a transformers ``...ForQuestionAnswering`` class, so their state_dict keys
are exactly transformers' (``<base_model_prefix>.*`` for the backbone, the class's own head keys),
and a directory written by transformers' own ``save_pretrained`` loads without renaming.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vlsparse.models.checkpoints import CheckpointError
from vlsparse.models.heads import head_outputs, widen_head

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def read_pretrained(path: Path, model_type: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Config dict and state_dict of a transformers ``save_pretrained`` directory.

    Weights are read from ``model.safetensors``, a sharded ``model.safetensors.index.json`` or
    ``pytorch_model.bin`` (weights only, no code execution), the first that exists.

    Raises:
        CheckpointError: no or unreadable config.json, a ``model_type`` other than ``model_type``,
            no weights file, or an unreadable one (the message names the file).
    """
    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_file}: expected a readable save_pretrained config.json ({exc})") from None
    if config.get("model_type") != model_type:
        raise CheckpointError(f"{cfg_file}: model_type {config.get('model_type')!r}, expected {model_type!r}")
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: no weights file ({', '.join(WEIGHT_FILES)})")
    try:
        if weights.name.endswith(".index.json"):
            shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
            state = {k: v for s in shards for k, v in load_file(str(path / s)).items()}
        elif weights.suffix == ".safetensors":
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{weights}: unreadable weights ({type(exc).__name__}: {str(exc)[:150]})") from None
    return config, state


class TaskHeadMixin:
    """Loading and task fitting for a transformers QA model used as a vlsparse model.

    A subclass sets ``task_head_prefixes`` (its answer head's state_dict prefixes), ``head_architectures``
    (transformers class name -> the vlsparse head kind its head is, :mod:`vlsparse.models.heads`), ``answers_field`` (the config field
    holding the number of answers), ``head_input`` (the head's first Linear, a module path) and
    implements ``_fit_visual``.

    Building the model honours ``config.task_head`` and ``config.task_images``
    (:mod:`vlsparse.models.heads`): the head has 1 output for ``rank`` and ``region``, and its first
    Linear takes K pooled vectors for ``pair``.
    """

    task_head_prefixes: tuple[str, ...] = ()
    #: the visual input projection's prefixes: new parameters when ``config.visual_input_fresh`` is set
    #: (a checkpoint whose projection takes another feature size, see ``_fit_visual``)
    visual_input_prefixes: tuple[str, ...] = ()
    head_architectures: dict[str, str] = {}
    answers_field: str = ""
    head_input: str = ""

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the parameters that are new for the task (trained with ``head_lr``,
        kept at θ0 by the re-initialisations): the task head φ0, and the visual input projection when it
        was freshly initialised for the task's feature size (``config.visual_input_fresh``)."""
        fresh = self.visual_input_prefixes if getattr(self.config, "visual_input_fresh", False) else ()
        return fresh + self.task_head_prefixes

    def __init__(self, config):
        kind = getattr(config, "task_head", "answer")
        answers = getattr(config, self.answers_field)
        setattr(config, self.answers_field, head_outputs(kind, answers))
        super().__init__(config)
        setattr(config, self.answers_field, answers)
        images = getattr(config, "task_images", 1) if kind == "pair" else 1
        parent, _, child = self.head_input.rpartition(".")
        module = self.get_submodule(parent)
        setattr(module, child, widen_head(self.get_submodule(self.head_input), images, config.initializer_range))

    @classmethod
    def read_directory(cls, path: Path):
        """(config, state_dict) of a transformers ``save_pretrained`` directory of this backbone.

        The backbone (``<base_model_prefix>.*``) is kept; the head only when the directory's
        architecture is one of ``head_architectures`` (or this class), whose head kind and image count
        are then set on the config (``task_head``, ``task_images``: a pair head reads ``num_images``
        images); other heads (pre-training, retrieval) are dropped: the task gets a new head φ0.

        Raises:
            CheckpointError: see :func:`read_pretrained`.
        """
        raw, state = read_pretrained(path, cls.config_class.model_type)
        config = cls.config_class.from_pretrained(str(path))
        kinds = [cls.head_architectures.get(a) for a in raw.get("architectures") or ()]
        kind = next((k for k in kinds if k), "answer" if cls.__name__ in (raw.get("architectures") or ()) else None)
        keep = (cls.base_model_prefix + ".",)
        if kind is not None:
            keep += cls.task_head_prefixes
            config.task_head = getattr(config, "task_head", kind)
            config.task_images = getattr(config, "task_images", getattr(config, "num_images", 1) if kind == "pair" else 1)
        return config, {k: v for k, v in state.items() if k.startswith(keep)}

    @classmethod
    def fit_task(cls, config, state: dict, img_dim: int | None, num_answers: int | None, source: str):
        """Adapt ``config`` (and drop a head from ``state``) to a task; returns ``(config, state)``.

        A head with another number of answers than ``num_answers`` is dropped (a new head φ0 of
        ``num_answers`` outputs is initialised); the visual input is checked by ``_fit_visual``.

        Raises:
            CheckpointError: the checkpoint's visual input does not fit the task.
        """
        cls._fit_visual(config, state, img_dim, source)
        if num_answers is not None and getattr(config, cls.answers_field) != num_answers:
            state = {k: v for k, v in state.items() if not k.startswith(cls.task_head_prefixes)}
            setattr(config, cls.answers_field, num_answers)
        return config, state

    @classmethod
    def _fit_visual(cls, config, state: dict, img_dim: int | None, source: str) -> None:
        raise NotImplementedError
