"""VCR 1.0 (Visual Commonsense Reasoning, Zellers et al., CVPR 2019): Q->A and QA->R as one 8-way example.

On-disk layout (``--data-dir DIR``, the annotation files as VCR ships them, plus the common
``features/`` / ``images/`` of :mod:`vlsparse.data.formats`):

* ``DIR/train.jsonl``, ``DIR/val.jsonl``: one question per line, fields used ``img_id`` (or, when
  absent, ``img_fn``, whose file stem is then the image key), ``objects`` (class name of each
  detected object, e.g. ``["person", "person", "car"]``), ``question``, ``answer_choices`` (4),
  ``answer_label``, ``rationale_choices`` (4), ``rationale_label``. Texts are token lists in which an
  object reference is a list of object indices, e.g. ``["What", "is", [0], "doing", "?"]``.
* ``DIR/features/`` (``visual="regions"``) or ``DIR/images/`` (``visual="pixels"``), keyed by the
  image key.

Splits: VCR's test labels are not public, so test = ``val.jsonl`` and val = ``val_fraction`` of the
``train.jsonl`` images with all their questions (:func:`~vlsparse.data.dataset.split_by_image`).

Text (UNITER / VisualBERT pre-processing of VCR, after r2c's ``_fix_tokenization``): an object
reference becomes its objects' class names joined by " and " (``[0, 2]`` -> "person and car");
tokens are joined by spaces, with no space before punctuation (``. , ? ! ; : % ) ] }``) or an English
clitic (``'s 're 've 'll 'd 'm n't``). Each question gives C = 8 candidate texts, scored one by one by
the model's ``rank`` head: the 4 Q->A texts ``f"{q} [SEP] {answer_i}"``, then the 4 QA->R texts
``f"{q} {right answer} [SEP] {rationale_j}"`` (BERT tokenizers keep ``[SEP]`` as the special token).

Labels: vocabulary ``["a0", "a1", "a2", "a3", "r0", "r1", "r2", "r3"]``; an example's answers are
``{f"a{answer_label}": 1.0, f"r{rationale_label}": 1.0}``, i.e. (8,) float32 targets one-hot in each
half. Objective: ``rank`` head, cross-entropy per group of 4, metric ``q_ar_accuracy`` (both right;
``q_a_accuracy`` and ``qa_r_accuracy`` are reported with it). Region features are not standardised.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vlsparse.data import formats
from vlsparse.data.dataset import TaskData, VLExample, split_by_image
from vlsparse.data.objective import Objective
from vlsparse.data.options import LoadOptions

__all__ = ["load_vcr", "render_tokens", "vcr_example", "VCR_ANSWERS", "VCR_OBJECTIVE", "NUM_CHOICES"]

#: answer / rationale choices per question
NUM_CHOICES = 4
#: label vocabulary: the logit positions of the 4 Q->A texts, then the 4 QA->R texts
VCR_ANSWERS = [f"a{i}" for i in range(NUM_CHOICES)] + [f"r{i}" for i in range(NUM_CHOICES)]
VCR_OBJECTIVE = Objective(head="rank", loss="ce", metric="q_ar_accuracy", groups=2)
#: default tokens per text ([CLS] and [SEP] included): a question, an answer and a rationale need more than 40
VCR_TEXT_LEN = 80

# tokens written without a space before them
_NO_SPACE_BEFORE = re.compile(r"[.,?!;:%)\]}]+|'(s|re|ve|ll|d|m)|n't", re.IGNORECASE)
_WHAT = "VCR annotations (one JSON object per line with question, answer_choices, rationale_choices, labels)"


def render_tokens(tokens: list, objects: list[str]) -> str:
    """A VCR token list as text: object references (lists of int indices into ``objects``) become the
    class names joined by " and "; tokens are joined by spaces, none before punctuation or clitics.

    ``render_tokens(["Is", [0, 2], "here", "?"], ["person", "person", "car"])`` -> "Is person and car here?"

    Raises:
        ValueError: a token that is neither a string nor a list of valid object indices.
    """
    out = ""
    for tok in tokens:
        if isinstance(tok, list):
            if not tok or not all(isinstance(i, int) and 0 <= i < len(objects) for i in tok):
                raise ValueError(f"object reference {tok!r}: expected indices into the {len(objects)} objects")
            tok = " and ".join(objects[i] for i in tok)
        elif not isinstance(tok, str):
            raise ValueError(f"token {tok!r}: expected a string or a list of object indices")
        out += tok if not out or _NO_SPACE_BEFORE.fullmatch(tok) else " " + tok
    return out


def _image_key(rec: dict) -> str:
    if "img_id" in rec:
        return str(rec["img_id"])
    return Path(rec["img_fn"]).stem


def vcr_example(rec: dict) -> VLExample:
    """One VCR annotation -> a :class:`~vlsparse.data.dataset.VLExample` with the 8 candidate texts (see the
    module docstring), ``answers`` ``{f"a{answer_label}": 1.0, f"r{rationale_label}": 1.0}``.

    Raises:
        ValueError: missing fields, not 4 choices, a label outside 0..3 or a bad token (the message
            names the annot_id).
    """
    where = f"annotation {rec.get('annot_id', '?')!r}"
    try:
        objects = [str(o) for o in rec["objects"]]
        q = render_tokens(rec["question"], objects)
        answers = [render_tokens(a, objects) for a in rec["answer_choices"]]
        rationales = [render_tokens(r, objects) for r in rec["rationale_choices"]]
        a_label, r_label = rec["answer_label"], rec["rationale_label"]
        key = _image_key(rec)
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    if len(answers) != NUM_CHOICES or len(rationales) != NUM_CHOICES:
        raise ValueError(f"{where}: expected {NUM_CHOICES} answer and rationale choices, "
                         f"got {len(answers)} and {len(rationales)}")
    for name, label in (("answer_label", a_label), ("rationale_label", r_label)):
        if not isinstance(label, int) or not 0 <= label < NUM_CHOICES:
            raise ValueError(f"{where}: {name} must be an int in 0..{NUM_CHOICES - 1}, got {label!r}")
    texts = tuple(f"{q} [SEP] {a}" for a in answers) + tuple(f"{q} {answers[a_label]} [SEP] {r}" for r in rationales)
    return VLExample(texts, key, {f"a{a_label}": 1.0, f"r{r_label}": 1.0}, question_type="vcr")


def _read(path: Path) -> list[VLExample]:
    out = []
    for n, rec in enumerate(formats.read_jsonl(path, _WHAT), 1):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        try:
            out.append(vcr_example(rec))
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
    return out


def load_vcr(tokenizer: Any, options: LoadOptions = LoadOptions()) -> TaskData:
    """Load VCR 1.0 from ``options.data_dir`` as a :class:`~vlsparse.data.dataset.TaskData` named "vcr".

    Reads ``train.jsonl`` and ``val.jsonl`` (see the module docstring for the fields, texts, labels
    and objective). Splits: train / val = ``train.jsonl`` split by image (``options.val_fraction`` of the
    images, chosen with ``options.seed``); test = ``val.jsonl``. Every item has ``input_ids`` (8, L) int64
    (L <= ``options.max_text_len``, default :data:`VCR_TEXT_LEN` = 80, [CLS] and [SEP] included) and
    ``targets`` (8,) float32. ``visual="regions"``: region features of ``data_dir/features``; "pixels":
    ``data_dir/images`` resized to ``options.image_size`` for ViLT.

    Raises:
        FileNotFoundError: ``data_dir`` None or missing, ``train.jsonl``/``val.jsonl`` missing, no
            features/images for some image (the message names the file or image).
        ValueError: malformed annotations (file:line and annot_id named), a bad ``val_fraction``.
    """
    options = options.with_defaults(max_text_len=VCR_TEXT_LEN)
    root = formats.data_root(options.data_dir, "vcr")
    train, val = split_by_image(_read(root / "train.jsonl"), options.val_fraction, options.seed)
    test = _read(root / "val.jsonl")
    return formats.task_data("vcr", root, (train, val, test), VCR_ANSWERS, VCR_OBJECTIVE, tokenizer, options)
