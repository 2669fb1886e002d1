"""What a bundle's files must hold before vlsparse runs them: the checks behind ``read_bundle`` and ``Pipeline``.

Each check raises :class:`BundleError` (a ValueError) with one line that names the file:

* :func:`check_manifest_entry`: a manifest path is a plain relative name inside the bundle (no ``..``, no
  absolute path, no backslash or control character) that no symlink leads through, and its entry is
  ``{"sha256": <64 hex>, "bytes": <int >= 0>}``;
* :func:`check_config`: config.json's sizes (answers, region features, positions, vocabulary) are
  positive integers where present;
* :func:`check_task`: task.json's answers fit the model's head, the region feature size fits the model,
  the train-split statistics (``feature_mean``, ``feature_std``: D floats each) are finite with every std
  > 0, ``max_text_len`` is an integer >= 2;
* :func:`load_tokenizer`: tokenizer.json parses and its vocabulary fits the model's embeddings;
* :func:`check_session_io`: an ONNX model's inputs are the model inputs vlsparse feeds (names, element
  types) and its output is (batch, answers) float;
* :func:`check_finite`: logits hold no NaN or Inf (:class:`NonFiniteError`);
* :func:`read_autotune`: autotune.json (``export --autotune``) is a record of that format whose layers each
  have a known ``choice`` and an (out, in) ``shape``.

Imports no torch and no onnx (the torch-free runtime install uses it).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["BundleError", "NonFiniteError", "check_manifest_entry", "check_config", "check_task", "load_tokenizer",
           "check_token_ids",
           "check_session_io", "check_finite", "read_autotune", "ANSWER_FIELDS", "REGION_FIELDS", "MODEL_INPUTS",
           "AUTOTUNE_FILE", "AUTOTUNE_FORMAT", "TUNED_FORMATS"]

#: config.json fields holding the answer count and the region feature size (UNITER, LXMERT, ViLT)
ANSWER_FIELDS = ("num_answers", "num_qa_labels", "num_labels")
REGION_FIELDS = ("img_dim", "visual_feat_dim")
#: ONNX input name -> its element type (what vlsparse.data.collate and the Pipeline feed)
MODEL_INPUTS = {"input_ids": "tensor(int64)", "attention_mask": "tensor(int64)", "img_feat": "tensor(float)",
                "img_pos": "tensor(float)", "img_mask": "tensor(int64)"}
#: ``vlsparse export --autotune``'s record beside the model (vlsparse.export.autotune writes it)
AUTOTUNE_FILE, AUTOTUNE_FORMAT = "autotune.json", "vlsparse-autotune-1"
TUNED_FORMATS = ("dense", "csr", "bitmask")
_SIZE_FIELDS = ANSWER_FIELDS + REGION_FIELDS + ("max_position_embeddings", "vocab_size")
_PART = re.compile(r"[^\x00-\x1f\x7f/\\]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BundleError(ValueError):
    """A bundle that cannot be written or read: missing or altered file, foreign or newer manifest, or a
    file whose contents do not fit (one line naming the file)."""


class NonFiniteError(ValueError):
    """A model output that is NaN or infinite (the message names the cause)."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_manifest_entry(root: Path, name: Any, entry: Any, manifest: Path) -> Path:
    """The file of one manifest entry, checked to be a plain relative name inside ``root`` with no symlink on
    the way (``root`` itself may be one); returns ``root / name``.

    Raises:
        BundleError: an absolute path, ``..`` / ``.`` / empty parts, a backslash or control character, a
            symlink, or an entry that is not ``{"sha256": hex, "bytes": int}`` (naming ``manifest`` or the file).
    """
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or any(p in ("", ".", "..") or not _PART.fullmatch(p) for p in parts):
        raise BundleError(f"{manifest}: file name {str(name)[:80]!r} is not a plain relative path inside the bundle")
    f = root.joinpath(*parts)
    for i in range(1, len(parts) + 1):
        if root.joinpath(*parts[:i]).is_symlink():
            raise BundleError(f"{root.joinpath(*parts[:i])}: a symlink in the bundle (listed in {manifest.name}); "
                              "bundles hold plain files only")
    if not (isinstance(entry, dict) and _is_int(entry.get("bytes")) and entry["bytes"] >= 0
            and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
        raise BundleError(f"{manifest}: the entry of {name} is not {{\"sha256\": <64 hex digits>, \"bytes\": <int>}}")
    return f


def _field(config: dict, names: Sequence[str]):
    return next((config[n] for n in names if n in config), None)


def check_config(config: dict, where: Path) -> None:
    """config.json's size fields (:data:`ANSWER_FIELDS`, :data:`REGION_FIELDS`, ``max_position_embeddings``,
    ``vocab_size``) are positive integers where present; ``id2label`` a JSON object where present.

    Raises:
        BundleError: naming ``where`` and the field.
    """
    for key in _SIZE_FIELDS:
        if key in config and not (_is_int(config[key]) and config[key] >= 1):
            raise BundleError(f"{where}: {key} must be a positive integer, got {str(config[key])[:40]}")
    if "id2label" in config and not isinstance(config["id2label"], dict):
        raise BundleError(f"{where}: id2label must be a JSON object")


def _head_size(config: dict) -> int | None:
    heads = _field(config, ANSWER_FIELDS)
    if heads is None and isinstance(config.get("id2label"), dict):
        heads = len(config["id2label"])  # transformers configs (ViLT) store the label count this way
    return heads


def _check_stats(task: dict, dim: Any, where: Path | str) -> None:
    for key in ("feature_mean", "feature_std"):
        values = task.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != dim:
            n = len(values) if isinstance(values, list) else type(values).__name__
            raise BundleError(f"{where}: {key} has {n} values, expected region_feature_dim = {dim}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise BundleError(f"{where}: {key} holds a value that is not a finite number")
        if key == "feature_std" and min(values, default=1.0) <= 0:
            raise BundleError(f"{where}: feature_std holds {min(values)}; every std must be > 0 (the features are "
                              "divided by it)")


def check_task(task: dict, config: dict, where: Path | str = "task info") -> None:
    """task.json (``task``) against config.json (``config``).

    Answers: a non-empty list of strings; with an answer or pair head (``config["task_head"]``, default
    answer) as many as the head has outputs. Region models (``visual`` "regions", the default): a
    ``region_feature_dim`` equal to the model's, ``feature_mean`` / ``feature_std`` of that length, finite,
    every std > 0. ``max_text_len``: an integer >= 2 or absent.

    Raises:
        BundleError: naming ``where`` (task.json) and what does not fit.
    """
    answers = task.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise BundleError(f"{where}: 'answers' must be a non-empty list of strings")
    heads = _head_size(config)
    if config.get("task_head", "answer") in ("answer", "pair") and len(answers) != heads:
        raise BundleError(f"{where}: {len(answers)} answers but the model's head has {heads}: "
                          "task.json and weights come from different tasks")
    dim, model_dim = task.get("region_feature_dim"), _field(config, REGION_FIELDS)
    if task.get("visual", "regions") == "regions":
        if dim != model_dim:
            raise BundleError(f"{where}: region features of size {dim}, the model expects {model_dim}")
        _check_stats(task, dim, where)
    max_len = task.get("max_text_len")
    if max_len is not None and not (_is_int(max_len) and max_len >= 2):
        raise BundleError(f"{where}: max_text_len must be an integer >= 2, got {str(max_len)[:40]}")


def load_tokenizer(path: Path, config: dict):
    """The ``tokenizers.Tokenizer`` of ``path`` (tokenizer.json), checked to parse and to give no token id
    beyond the model's embeddings (``vocab_size`` of ``config``).

    Raises:
        BundleError: unreadable or not a tokenizer, or a vocabulary larger than the model's (naming the file).
    """
    from tokenizers import Tokenizer  # the runtime install has it

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for every parse error
        raise BundleError(f"{path}: not a tokenizer file ({str(exc).splitlines()[0][:200] if str(exc) else exc!r})") \
            from None
    vocab = config.get("vocab_size")
    if _is_int(vocab) and tok.get_vocab_size(with_added_tokens=True) > vocab:
        raise BundleError(f"{path}: {tok.get_vocab_size(with_added_tokens=True)} tokens, more than the model's "
                          f"vocab_size {vocab}: tokenizer and model do not belong together")
    try:  # a tokenizer that parses can still fail on its first text (e.g. WordLevel without its unk token)
        check_token_ids(tok.encode("what color is the shape?").ids, config, path)
    except Exception as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{path}: the tokenizer fails on a question ({str(exc).splitlines()[0][:200]})") from None
    return tok


def check_token_ids(ids: Sequence[int] | np.ndarray, config: dict, path: Path) -> None:
    """Every token id is below config.json's ``vocab_size`` (when given) and >= 0.

    Raises:
        BundleError: an id outside the model's embeddings (naming ``path``, tokenizer.json).
    """
    vocab = config.get("vocab_size")
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or _is_int(vocab) and ids.max() >= vocab):
        raise BundleError(f"{path}: gives token id {int(ids.max())}, outside the model's vocab_size {vocab}")


def check_session_io(session: Any, answers: int, where: Path) -> None:
    """An onnxruntime session's inputs are among :data:`MODEL_INPUTS` with their element types (input_ids,
    attention_mask and img_feat among them) and its first output is a rank-2 float tensor with ``answers``
    columns (or a symbolic size).

    Raises:
        BundleError: naming ``where`` (model.onnx) and the input or output that does not fit.
    """
    inputs = {i.name: i.type for i in session.get_inputs()}
    for name, typ in inputs.items():
        if MODEL_INPUTS.get(name) != typ:
            raise BundleError(f"{where}: input {name!r} of type {typ} is not a vlsparse model input "
                              f"({', '.join(f'{k} {v}' for k, v in MODEL_INPUTS.items())})")
    missing = [n for n in ("input_ids", "attention_mask", "img_feat") if n not in inputs]
    if missing:
        raise BundleError(f"{where}: lacks the input {missing[0]}")
    outputs = session.get_outputs()
    shape = list(outputs[0].shape or []) if outputs else []
    fits = len(shape) == 2 and (shape[1] == answers or not isinstance(shape[1], int))  # None, "answers": dynamic
    if not (outputs and outputs[0].type == "tensor(float)" and fits):
        got = f"{outputs[0].type} {shape}" if outputs else "no output"
        raise BundleError(f"{where}: output must be (batch, {answers}) float logits, got {got}")


def check_finite(logits: np.ndarray, inputs_finite: bool, model: Path, first: int = 0, single: bool = False) -> None:
    """Refuse (B, A) logits with NaN or Inf; the message names the first bad row as ``question[first + row]``
    (``question`` when ``single``) and the cause: the model's weights when the inputs were finite, else the
    inputs.

    Raises:
        NonFiniteError: some logit is not finite.
    """
    bad = ~np.isfinite(logits)
    if not bad.any():
        return
    row = int(np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))[0])
    what = "NaN" if np.isnan(logits).any() else "Inf"
    cause = (f"from finite inputs, so the weights in {model} hold non-finite values (re-export the model)"
             if inputs_finite else "because the inputs hold non-finite values")
    raise NonFiniteError(f"{'question' if single else f'question[{first + row}]'}: the model gave {what} scores "
                         f"{cause}")


def read_autotune(directory: Path) -> dict | None:
    """The autotune record in ``directory`` (None when there is none), its structure checked: format
    ``vlsparse-autotune-1``, a ``layers`` object whose entries each have a ``choice`` in
    :data:`TUNED_FORMATS` and a ``shape`` of two positive integers.

    Raises:
        BundleError: unreadable JSON or another structure, naming the file (and the layer).
    """
    f = Path(directory) / AUTOTUNE_FILE
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{f}: unreadable JSON ({type(exc).__name__})") from None
    layers = record.get("layers") if isinstance(record, dict) else None
    if not isinstance(layers, dict) or record.get("format") != AUTOTUNE_FORMAT:
        raise BundleError(f"{f}: not a vlsparse autotune record (format {AUTOTUNE_FORMAT} with a layers object)")
    for name, entry in layers.items():
        if not isinstance(entry, dict) or entry.get("choice") not in TUNED_FORMATS:
            raise BundleError(f"{f}: layer {name!r}: choice must be one of {', '.join(TUNED_FORMATS)}")
        shape = entry.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)):
            raise BundleError(f"{f}: layer {name!r}: shape must be [out, in] positive integers")
    return record
