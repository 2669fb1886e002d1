"""VQA v2 (Goyal et al., CVPR 2017) from its official json files, as UNITER and LXMERT fine-tune on it.

Answers are normalised as the official evaluation does (:func:`normalize_answer`), every question's
10 human answers become the official soft scores 0.3/0.6/0.9/1.0 (:func:`~vlsparse.data.dataset.soft_score`) over
an answer vocabulary (LXMERT's ``trainval_label2ans.json`` when present, else bottom-up-attention-vqa's
frequency rule, :func:`answer_vocabulary`), and the model is trained with binary cross-entropy and
scored with the VQA score (the examples become a :class:`~vlsparse.data.dataset.TaskData` through
:func:`vlsparse.data.formats.task_data`, as in every task loader).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlsparse.data import formats
from vlsparse.data.dataset import TaskData, VLExample, soft_score, split_by_image
from vlsparse.data.objective import VQA_OBJECTIVE
from vlsparse.data.options import LoadOptions

__all__ = ["load_vqa", "normalize_answer", "answer_vocabulary", "read_label2ans", "coco_image_key",
           "VQA_FILES", "LABEL2ANS_FILE"]

#: COCO split -> (questions file, annotations file), names as the VQA v2 release ships them
VQA_FILES = {split: (f"v2_OpenEnded_mscoco_{split}2014_questions.json", f"v2_mscoco_{split}2014_annotations.json")
             for split in ("train", "val")}
#: LXMERT's answer list (index = label), the vocabulary when present (VQA and GQA)
LABEL2ANS_FILE = "trainval_label2ans.json"

# --- the official evaluation's answer normalisation (GT-Vision-Lab/VQA, vqaEval.py) ---
_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"\.(?!\d)")  # vqaEval's "(?!<=\d)(\.)(?!\d)": its first group never matches
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset({"a", "an", "the"})
#: the common single-apostrophe entries of vqaEval's ``contractions`` map (written without -> with apostrophe)
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't aren't can't couldn't didn't doesn't don't hadn't hasn't haven't isn't mightn't mustn't needn't "
    "shan't shouldn't wasn't weren't won't wouldn't could've might've must've should've would've he'd he's "
    "how's it'd it'll ma'am o'clock that's there's they'd they'll they're they've we've what's where's who's "
    "you'd you'll you're you've y'all").split()}


@functools.lru_cache(maxsize=1 << 16)
def normalize_answer(answer: str) -> str:
    """An answer as the official VQA evaluation compares it (vqaEval.py ``processPunctuation`` then
    ``processDigitArticle``; bottom-up-attention-vqa's ``preprocess_answer`` is the same):

    1. newlines/tabs to spaces, outer whitespace stripped;
    2. each of ``;/[]"{}()=+\\_-><@`,?!`` is deleted when it touches a space in the answer or the
       answer has a digit-comma-digit ("1,000"), else replaced by a space; a period not followed by a
       digit is deleted ("2.5" keeps its period);
    3. lower-cased, split on whitespace; number words zero..ten (and "none") become digits, the
       articles a/an/the are dropped, and common contractions written without their apostrophe get it
       back ("dont" -> "don't"; a subset of vqaEval's map, see ``_CONTRACTIONS``); words joined by one space.

    E.g. "Two dogs." -> "2 dogs", "a red car" -> "red car", "yes!" -> "yes".
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    drop_all = _COMMA_STRIP.search(text) is not None
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if drop_all or p + " " in text or " " + p in text else " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def coco_image_key(split: str, image_id: int) -> str:
    """``"COCO_train2014_000000000009"``: the COCO file stem, LXMERT's / bottom-up TSV ``img_id``."""
    return f"COCO_{split}2014_{int(image_id):012d}"


def answer_vocabulary(answers: Iterable[str], num_answers: int = 3129, min_answer_count: int = 9) -> list[str]:
    """The answer vocabulary of bottom-up-attention-vqa (``tools/compute_softscore.py``, ``filter_answers``):
    the (already normalised) ``answers`` -- one per question, its ``multiple_choice_answer`` -- that occur at
    least ``min_answer_count`` times, the ``num_answers`` most frequent, most frequent first, ties by string.

    Raises:
        ValueError: ``num_answers`` or ``min_answer_count`` < 1.
    """
    if num_answers < 1 or min_answer_count < 1:
        raise ValueError(f"num_answers and min_answer_count must be >= 1, got {num_answers}, {min_answer_count}")
    counts = Counter(answers)
    ranked = sorted((a for a, c in counts.items() if c >= min_answer_count), key=lambda a: (-counts[a], a))
    return ranked[:num_answers]


def read_label2ans(path: Path) -> list[str]:
    """LXMERT's ``trainval_label2ans.json``: a JSON list of distinct answer strings, index = label.

    Raises:
        ValueError: not a non-empty list of distinct strings (the message names the file).
    """
    answers = formats.read_json(path, "a JSON list of answer strings (index = label)")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{path}: expected a non-empty JSON list of answer strings (index = label)")
    if len(set(answers)) != len(answers):
        raise ValueError(f"{path}: the answer list has duplicates")
    return answers


def _read_split(root: Path, split: str) -> list[tuple[dict, dict]]:
    """(question, annotation) pairs of one COCO split, in question-file order."""
    qpath, apath = (root / f for f in VQA_FILES[split])
    questions = formats.read_json(qpath, 'VQA v2 questions {"questions": [{"image_id", "question", "question_id"}]}')
    annotations = formats.read_json(apath, 'VQA v2 annotations {"annotations": [{"question_id", "image_id", '
                                           '"answers", "multiple_choice_answer", "answer_type"}]}')
    try:
        by_id = {a["question_id"]: a for a in annotations["annotations"]}
        pairs = [(q, by_id.pop(q["question_id"], None)) for q in questions["questions"]]
    except (KeyError, TypeError):
        raise ValueError(f"{qpath} / {apath}: expected {{'questions': [...]}} / {{'annotations': [...]}} "
                         "with question_id in every entry") from None
    for q, a in pairs:
        if a is None:
            raise ValueError(f"{apath}: no annotation for question {q['question_id']} of {qpath}")
        if a.get("image_id") != q.get("image_id"):
            raise ValueError(f"{apath}: question {q['question_id']} has image {a.get('image_id')}, "
                             f"{q.get('image_id')} in {qpath}")
    if by_id:
        raise ValueError(f"{qpath}: no question for {len(by_id)} annotations of {apath}, e.g. {next(iter(by_id))}")
    return pairs


def _example(q: dict, a: dict, split: str, path: Path) -> VLExample:
    try:
        counts = Counter(normalize_answer(x["answer"]) for x in a["answers"])
        return VLExample(q["question"], coco_image_key(split, q["image_id"]),
                          {ans: soft_score(c) for ans, c in counts.items()}, question_type=a["answer_type"])
    except (KeyError, TypeError, AttributeError, ValueError, OverflowError):  # int(image_id) of "x", of 1e999
        raise ValueError(f"{path}: question {q.get('question_id')}: expected question, image_id, "
                         "answers [{answer}] and answer_type") from None


def load_vqa(tokenizer: Any, options: LoadOptions = LoadOptions(), *, num_answers: int = 3129,
             min_answer_count: int = 9) -> TaskData:
    """Load VQA v2 from ``options.data_dir`` as a :class:`~vlsparse.data.dataset.TaskData` named "vqa".

    Files read (the official release, visualqa.org): ``v2_OpenEnded_mscoco_{train,val}2014_questions.json``
    (``{"questions": [{"image_id", "question", "question_id"}]}``) and ``v2_mscoco_{train,val}2014_annotations.json``
    (``{"annotations": [{"question_id", "image_id", "answers": [{"answer", ...}] x 10, "multiple_choice_answer",
    "answer_type", ...}]}``); every question must have exactly one annotation on the same image.

    Splits: train = train2014 less ``options.val_fraction`` of its images (chosen with ``options.seed``,
    :func:`~vlsparse.data.dataset.split_by_image`), val = those images' questions, test = val2014 (the test-dev
    answers are not public). UNITER/LXMERT instead train on train2014 + most of val2014 and test on test-dev.

    Targets: each question's 10 answers are normalised (:func:`normalize_answer`) and an answer given by
    ``c`` annotators scores 0.3, 0.6, 0.9 for c = 1, 2, 3 and 1.0 for c >= 4; answers outside the vocabulary are dropped. Vocabulary:
    ``data_dir/trainval_label2ans.json`` (LXMERT's 3,129 answers, index = label) when present, else
    :func:`answer_vocabulary` of the normalised ``multiple_choice_answer`` of every train2014 question
    with ``num_answers`` and ``min_answer_count`` (bottom-up-attention-vqa counts train2014 + val2014, which is
    our test split, so we count train2014 only). ``question_type`` = ``answer_type`` ("yes/no", "number", "other").
    Objective: :data:`~vlsparse.data.objective.VQA_OBJECTIVE` (answer head, binary cross-entropy, VQA score).

    Images: :func:`coco_image_key` (``COCO_train2014_000000000009``), region features in ``data_dir/features``
    (``visual="regions"``, used as they are) or ``data_dir/images/<key>.jpg`` (``"pixels"``, shortest edge
    ``options.image_size``).

    Raises:
        FileNotFoundError: ``data_dir`` None or missing, one of the four json files, features / images of an
            example (the message names the file or the keys).
        ValueError: a file that is not valid JSON or lacks the fields above, questions and annotations that
            disagree (names the file), an invalid label2ans file, an empty vocabulary,
            ``num_answers`` / ``min_answer_count`` < 1, bad ``val_fraction`` / ``image_size``.
    """
    root = formats.data_root(options.data_dir, "vqa")
    data = {split: _read_split(root, split) for split in VQA_FILES}
    examples = {split: [_example(q, a, split, root / VQA_FILES[split][1]) for q, a in pairs]
                for split, pairs in data.items()}
    if (root / LABEL2ANS_FILE).is_file():
        answers = read_label2ans(root / LABEL2ANS_FILE)
    else:
        try:
            mc = [normalize_answer(a["multiple_choice_answer"]) for _, a in data["train"]]
        except (KeyError, AttributeError):
            raise ValueError(f"{root / VQA_FILES['train'][1]}: every annotation needs multiple_choice_answer") from None
        answers = answer_vocabulary(mc, num_answers, min_answer_count)
        if not answers:
            raise ValueError(f"{root / VQA_FILES['train'][1]}: no answer is the multiple_choice_answer of "
                             f"{min_answer_count}+ questions; lower min_answer_count or add {LABEL2ANS_FILE}")
    train, val = split_by_image(examples["train"], options.val_fraction, options.seed)
    return formats.task_data("vqa", root, (train, val, examples["val"]), answers, VQA_OBJECTIVE, tokenizer, options)
