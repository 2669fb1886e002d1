"""Model registry: presets, local ``save_pretrained`` directories and official checkpoint files.

Every model returned here is an ``nn.Module`` whose ``forward(**batch)`` returns task logits and
whose ``prune_scope()`` lists the prunable weight names (its backbone's own definition).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertTokenizerFast

from vlsparse.models.checkpoints import (CheckpointError, config_from_official, load_minilm_state, map_official_uniter,
                                         minilm_dir, read_torch_state)
from vlsparse.models.hf import read_pretrained
from vlsparse.models.lxmert import LxmertForTask, is_original_lxmert
from vlsparse.models.uniter import UniterConfig, UniterForTask
from vlsparse.models.vilt import ViltForTask


@dataclass(frozen=True)
class Preset:
    """A named model configuration. ``init`` is "random" or "minilm" (pre-trained text weights);
    ``model_type`` selects the class in :data:`MODEL_TYPES` (``config`` holds its config fields)."""

    config: dict
    init: str
    description: str
    model_type: str = "uniter"


_MINILM = dict(hidden_size=384, num_attention_heads=12, intermediate_size=1536, vocab_size=30522,
               max_position_embeddings=512, pooling="mean")
PRESETS: dict[str, Preset] = {
    "uniter-tiny": Preset(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                               vocab_size=30522, max_position_embeddings=64, pooling="cls"),
                          "random", "2 layers, hidden 64, random init (tests)"),
    "uniter-minilm": Preset(dict(_MINILM, num_hidden_layers=6), "minilm",
                            "6 layers, hidden 384, text embeddings + encoder from MiniLM-L6-H384, mean pooling"),
    "uniter-minilm-l2": Preset(dict(_MINILM, num_hidden_layers=2), "minilm",
                               "first 2 MiniLM layers, mean pooling (the 2-core main job)"),
    "uniter-base": Preset(dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                               vocab_size=30522, max_position_embeddings=512, pooling="cls"),
                          "random", "UNITER-base shape (12 x 768), random init; load real weights with --model PATH"),
    "lxmert-tiny": Preset(dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, l_layers=2, r_layers=1,
                               x_layers=1, max_position_embeddings=64, num_qa_labels=3129),
                          "random", "2 language, 1 visual, 1 cross-modality layer, hidden 64, random init (tests)",
                          "lxmert"),
    "lxmert-base": Preset(dict(num_qa_labels=3129), "random",
                          "LXMERT shape (9 language, 5 visual, 5 cross-modality layers x 768), random init; "
                          "load real weights with --model PATH", "lxmert"),
    "vilt-tiny": Preset(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             image_size=96, patch_size=32, num_labels=3129),
                        "random", "2 layers, hidden 64, 96 px images in 32 px patches, random init (tests)", "vilt"),
    "vilt-base": Preset(dict(num_labels=3129), "random",
                        "ViLT-B/32 shape (12 x 768, 384 px images, 32 px patches), random init; "
                        "load real weights with --model PATH", "vilt"),
}


def default_tokenizer() -> BertTokenizerFast:
    """The bert-base-uncased WordPiece tokenizer (30,522 tokens) shipped with MiniLM."""
    return BertTokenizerFast.from_pretrained(str(minilm_dir()))


def load_tokenizer(name: str) -> BertTokenizerFast:
    """The tokenizer of a model: the directory's own vocab.txt if it has one, else :func:`default_tokenizer`."""
    path = Path(name)
    if name not in PRESETS and path.is_dir() and (path / "vocab.txt").is_file():
        return BertTokenizerFast.from_pretrained(str(path))
    return default_tokenizer()


def _check_img_dim(config: UniterConfig, img_dim: int | None, source: str) -> None:
    if img_dim is not None and config.img_dim != img_dim:
        raise CheckpointError(f"{source}: model expects region features of size {config.img_dim}, "
                              f"the task gives {img_dim}")


def load_model(name: str, img_dim: int | None = None, num_answers: int | None = None,
               seed: int = 0, head: str = "answer", num_images: int = 1) -> tuple[UniterForTask, BertTokenizerFast]:
    """Build or load a model for a task; return ``(model, tokenizer)``.

    Args:
        name: a preset name (see :data:`PRESETS`), a directory written by ``save_pretrained`` (by
            vlsparse, or by transformers for LXMERT / ViLT, see :mod:`vlsparse.models.hf`), an
            official UNITER checkpoint file (``.pt``; keys ``uniter.*``) or an original LXMERT one
            (airsplay/lxmert ``.pth``; keys ``[module.]bert.*``).
        img_dim: region feature size D of the task's data (None: the preset's or file's own; must
            be None for a model that reads pixels, see :func:`visual_input`).
        num_answers: answer vocabulary size A of the task (None: the preset's or file's own).
            An LXMERT or ViLT checkpoint whose head has another size gets a new head φ0; an LXMERT
            checkpoint whose ``visual_feat_dim`` is not ``img_dim`` likewise gets a new visual input
            projection (part of φ0, with a warning naming both sizes). A UNITER checkpoint whose image
            embeddings take another feature size is refused (CheckpointError).
        seed: seed of the random init (the VQA head φ0, and the whole model for random presets).
        head: the task head, "answer" | "pair" | "rank" | "region" (:mod:`vlsparse.models.heads`); a
            checkpoint whose head is another kind gets a new head φ0.
        num_images: images per example of the ``pair`` head.

    Raises:
        ValueError: unknown preset name / path that does not exist; region features for a pixel model.
        CheckpointError: a file that cannot be read or does not fit the task.
    """
    torch.manual_seed(seed)
    task_head = dict(task_head=head, task_images=num_images if head == "pair" else 1)
    cls = model_class(name)
    if cls is not UniterForTask:  # LXMERT / ViLT: a preset or a save_pretrained directory
        return _load_hf(cls, name, img_dim, num_answers, seed, task_head)
    if name in PRESETS:
        return _uniter_preset(PRESETS[name], img_dim, num_answers, task_head)
    path = Path(name)
    if not path.exists():
        raise ValueError(f"--model {name!r}: not a preset ({', '.join(PRESETS)}) nor an existing path")
    if path.is_dir():
        return _uniter_directory(name, img_dim, num_answers, seed, task_head)
    raw = read_torch_state(path)
    if is_original_lxmert(raw):
        return _load_hf(LxmertForTask, name, img_dim, num_answers, seed, task_head, original=raw)
    return _official_uniter(raw, path, img_dim, num_answers, task_head)


def _uniter_preset(preset: Preset, img_dim: int | None, num_answers: int | None,
                   task_head: dict) -> tuple[UniterForTask, BertTokenizerFast]:
    """:func:`load_model` for a UNITER preset: random init, or MiniLM's text weights (``init="minilm"``)."""
    dims = {k: v for k, v in dict(img_dim=img_dim, num_answers=num_answers).items() if v is not None}
    config = UniterConfig(**dims, **task_head, **preset.config)
    model = UniterForTask(config)
    if preset.init == "minilm":
        _load_state(model, load_minilm_state(config.num_hidden_layers), strict_prefix="uniter.encoder.")
    return model.eval(), default_tokenizer()


def _uniter_directory(name: str, img_dim: int | None, num_answers: int | None, seed: int,
                      task_head: dict) -> tuple[UniterForTask, BertTokenizerFast]:
    """:func:`load_model` for a UNITER ``save_pretrained`` directory; a head that does not fit the task
    is replaced by a new one (φ0)."""
    path = Path(name)
    state = read_pretrained(path, "uniter")[1]
    config = UniterConfig.from_pretrained(str(path))
    _check_img_dim(config, img_dim, str(path))
    if _new_head(config, "num_answers", num_answers, task_head):
        state = _without_head(state, ("vqa_output.",))
        config.update(task_head)
        config.num_answers = num_answers or config.num_answers
    torch.manual_seed(seed)
    model = UniterForTask(config)
    _load_state(model, state, strict_prefix="uniter.")
    return model.eval(), load_tokenizer(name)


def _official_uniter(raw: dict[str, torch.Tensor], path: Path, img_dim: int | None, num_answers: int | None,
                     task_head: dict) -> tuple[UniterForTask, BertTokenizerFast]:
    """:func:`load_model` for an official UNITER checkpoint file (ChenRocks/UNITER state_dict ``raw``)."""
    state = map_official_uniter(raw)
    fields = config_from_official(state)
    if _new_head(UniterConfig(**fields), "num_answers", num_answers, task_head):
        state = _without_head(state, ("vqa_output.",))
    if num_answers is not None:
        fields["num_answers"] = num_answers
    config = UniterConfig(pooling="cls", img_embeddings_pretrained=True, **task_head, **fields)
    _check_img_dim(config, img_dim, str(path))
    model = UniterForTask(config)
    _load_state(model, state, strict_prefix="uniter.encoder.")
    tokenizer = default_tokenizer()
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(f"{path}: word embeddings have {config.vocab_size} rows but the default uncased "
                              f"tokenizer has {len(tokenizer)} tokens; official UNITER uses bert-base-cased: save the "
                              "model with save_pretrained together with its vocab.txt and load that directory")
    return model.eval(), tokenizer


#: config.json ``model_type`` -> model class (its ``config_class`` parses the config)
MODEL_TYPES = {"uniter": UniterForTask, "lxmert": LxmertForTask, "vilt": ViltForTask}


def model_class(name: str) -> type:
    """The class :func:`load_model` builds for ``name``: by preset, by the ``model_type`` of a
    directory's config.json; UniterForTask otherwise (checkpoint files: official UNITER, or an
    original LXMERT file, recognised when it is read; both read region features)."""
    if name in PRESETS:
        return MODEL_TYPES[PRESETS[name].model_type]
    cfg = Path(name) / "config.json"
    try:
        return MODEL_TYPES.get(json.loads(cfg.read_text()).get("model_type"), UniterForTask)
    except (OSError, ValueError, AttributeError):
        return UniterForTask


def visual_input(name: str) -> str:
    """What the model ``name`` (preset or path) reads: "regions" (features + boxes) or "pixels" (images)."""
    return getattr(model_class(name), "visual_input", "regions")


def _new_head(config, answers_field: str, num_answers: int | None, task_head: dict) -> bool:
    """Whether a checkpoint's head (``config``; its size in the field ``answers_field``) cannot serve the
    task: another kind, image count or size."""
    return (getattr(config, "task_head", "answer") != task_head["task_head"]
            or getattr(config, "task_images", 1) != task_head["task_images"]
            or (num_answers is not None and getattr(config, answers_field) != num_answers))


def _without_head(state: dict[str, torch.Tensor], head_prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``state`` less the head's weights: the task gets a new head φ0."""
    return {k: v for k, v in state.items() if not k.startswith(head_prefixes)}


def _load_hf(cls, name: str, img_dim: int | None, num_answers: int | None, seed: int, task_head: dict,
             original: dict[str, torch.Tensor] | None = None):
    """:func:`load_model` for the transformers-based backbones (LXMERT, ViLT): a preset, a
    ``save_pretrained`` directory, or (``original``) an airsplay/lxmert state_dict."""
    if name in PRESETS:
        config, state = cls.config_class(**PRESETS[name].config), {}
    elif original is not None:
        config, state = cls.from_original_state(original)
    else:
        config, state = cls.read_directory(Path(name))
    if _new_head(config, cls.answers_field, num_answers, task_head):
        state = _without_head(state, cls.task_head_prefixes)
    config.update(task_head)
    config, state = cls.fit_task(config, state, img_dim, num_answers, source=name)
    torch.manual_seed(seed)
    model = cls(config)
    if state:
        _load_state(model, state, strict_prefix=cls.base_model_prefix + ".", fresh=tuple(model.head_prefixes))
    tokenizer = load_tokenizer(name)
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(f"{name}: word embeddings have {config.vocab_size} rows, the tokenizer {len(tokenizer)}")
    return model.eval(), tokenizer


def model_from_config(config: dict) -> UniterForTask:
    """A freshly initialised model for a config dict (as in config.json); weights are then loaded.

    Raises:
        CheckpointError: unknown ``model_type``.
    """
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
        raise CheckpointError(f"config.json: model_type {kind!r} is not one of {', '.join(MODEL_TYPES)}")
    cls = MODEL_TYPES[kind]
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    return cls(cls.config_class(**fields)).eval()


def dims_from_state(state: dict[str, torch.Tensor]) -> tuple[int | None, int]:
    """(img_dim, num_answers) of a vlsparse model's state_dict, read off the image input and head
    shapes (img_dim is None for a model that reads pixels).

    Raises:
        CheckpointError: the keys are missing (not a vlsparse UNITER, LXMERT or ViLT state_dict).
    """
    for cls in (LxmertForTask, ViltForTask):
        if (dims := cls.task_dims(state)) is not None:
            return dims
    try:
        return (state["uniter.img_embeddings.img_linear.weight"].shape[1], state["vqa_output.3.weight"].shape[0])
    except KeyError as exc:
        raise CheckpointError(f"weights lack {exc.args[0]!r}: not a UNITER VQA state_dict") from None


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], strict_prefix: str,
                fresh: tuple[str, ...] = ()) -> list[str]:
    """Copy ``state`` into ``model``; every model key under ``strict_prefix`` must be present, except the
    new parameters (prefixes ``fresh``).

    Returns the model keys that were not in ``state``. Raises CheckpointError on unexpected keys,
    shape mismatches, or a missing key under ``strict_prefix``.
    """
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(f"checkpoint has keys the model does not: {unexpected[:5]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(own[k].shape)}")
    missing = sorted(set(own) - set(state))
    needed = [k for k in missing if k.startswith(strict_prefix) and not k.startswith(fresh)]
    if needed:
        raise CheckpointError(f"checkpoint lacks {len(needed)} weights, e.g. {needed[0]}")
    model.load_state_dict(state, strict=False)
    return missing


__all__ = ["PRESETS", "Preset", "UniterConfig", "UniterForTask", "CheckpointError", "load_model", "load_tokenizer",
           "default_tokenizer", "model_from_config", "dims_from_state", "MODEL_TYPES", "LxmertForTask", "ViltForTask",
           "model_class", "visual_input"]
