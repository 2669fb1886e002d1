"""Answer questions about images with an exported bundle: ``vlsparse.Pipeline``.

    pipe = vlsparse.Pipeline.load("exports/easy-vqa-onnx")     # any bundle written by `vlsparse export`
    pipe("shape.png", "what color is the shape?")               # [("red", 0.98), ("blue", 0.01), ...]
    pipe([img_a, img_b], ["is it a circle?", "what shape is this?"])   # one list per question

The runtime follows the bundle's kind (its manifest.json), through the kind's
:class:`~vlsparse.runtime.runners.Runner`: ``csr`` runs PyTorch with
:class:`~vlsparse.sparse.linear.SparseLinear` (our SpMM kernels); ``onnx`` runs stock onnxruntime and
``onnx-sparse`` onnxruntime with the vlsparse custom-op library. The ONNX path imports no
torch, transformers or onnx: onnxruntime, numpy, scipy, Pillow and tokenizers are enough.

Pre-processing is the one used in training (vlsparse.data): region features of the image
(:func:`vlsparse.data.visual.regions.extract_regions`, standardised with the bundle's train-split
feature_mean / feature_std) and the question tokenized by the bundle's tokenizer.json
(``[CLS] ... [SEP]``, truncated to max_text_len tokens), batched and padded as
:func:`vlsparse.data.collate` does. Region-feature models (UNITER, LXMERT) are supported; bundles of
pixel models (ViLT, task.json ``visual: "pixels"``) are refused with a BundleError.

Safety: :meth:`Pipeline.load` checks every file before the first call (the manifest and contents through
:func:`~vlsparse.runtime.bundle.read_bundle`, then the tokenizer, the model file and, for ONNX, the model's
inputs and outputs); inputs are bounded (:mod:`vlsparse.runtime.inputs`: at most ``max_image_pixels``
pixels per image, down-sampled to ``region_image_side``, questions of at most ``max_question_chars``
characters and ``max_text_len`` tokens, cuts reported by :meth:`Pipeline.predict` and a
:class:`~vlsparse.runtime.inputs.QuestionTruncated` warning); scores are never NaN: a non-finite logit
raises :class:`~vlsparse.runtime.checks.NonFiniteError`.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from vlsparse.data.visual.regions import EXTRACTOR_VERSION, NUM_REGIONS, REGION_FEATURE_DIM, extract_regions
from vlsparse.runtime.bundle import TOKENIZER_FILE, Bundle, BundleError, read_bundle
from vlsparse.runtime.checks import check_finite, check_token_ids, load_tokenizer
from vlsparse.runtime.inputs import (MAX_IMAGE_PIXELS, MAX_QUESTION_CHARS, REGION_IMAGE_SIDE, InputLimits,
                                     QuestionTruncated, cut_question, image_array)
from vlsparse.runtime.runners import Runner, load_runner

__all__ = ["Pipeline", "Prediction", "InputLimits", "QuestionTruncated", "answer_report"]

Image = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray (H, W, 3) uint8


@dataclass
class Prediction:
    """One question's result: ``answers`` (top-k ``(answer, score)`` pairs, best first, scores in [0, 1]),
    ``truncated`` (True when part of the question was cut: more than ``max_text_len`` tokens or
    ``max_question_chars`` characters) and ``tokens`` (the tokens the model read, [CLS] and [SEP] included)."""

    answers: list[tuple[str, float]]
    truncated: bool
    tokens: int


def _checked(images: Sequence[Image], questions: Sequence[str],
             limits: InputLimits) -> tuple[list[np.ndarray], list[str]]:
    """Images as (H, W, 3) uint8 arrays and the questions, checked; errors name ``question[i]`` / ``image[i]``
    (without the index for a single pair)."""
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images and {len(questions)} questions; expected one image per question")
    if not questions:
        raise ValueError("no questions given")
    at = (lambda i: f"[{i}]") if len(questions) > 1 else (lambda i: "")
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"question{at(i)}: expected a non-empty string, got {q!r}")
    return [image_array(im, f"image{at(i)}", limits) for i, im in enumerate(images)], list(questions)


class Pipeline:
    """(image, question) -> top-k answers with scores, from an exported bundle.

    Build it with :meth:`load`. Attributes: ``bundle`` (the verified :class:`~vlsparse.runtime.bundle.Bundle`),
    ``answers`` (list of str, index = logit position), ``kind`` ("csr" | "onnx" | "onnx-sparse"), ``runner``
    (the loaded model: :class:`~vlsparse.runtime.runners.Runner`, numpy inputs -> (B, A) float32 logits),
    ``limits`` (:class:`~vlsparse.runtime.inputs.InputLimits`), ``max_text_len`` (tokens read per question).
    """

    def __init__(self, bundle: Bundle, runner: Runner, batch_size: int = 32, limits: InputLimits | None = None):
        task = bundle.task
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name in ("task.json", TOKENIZER_FILE):
            if not bundle.has(name):
                raise BundleError(f"{bundle.path / name}: missing; the bundle was exported without task info "
                                  "or tokenizer (re-export with `vlsparse export`)")
        if task.get("visual", "regions") != "regions":
            raise BundleError(f"{bundle.path / 'task.json'}: the model reads image {task['visual']} (ViLT); Pipeline "
                              "runs region-feature models (UNITER, LXMERT) only")
        if task.get("region_extractor") != EXTRACTOR_VERSION or task.get("region_feature_dim") != REGION_FEATURE_DIM:
            raise BundleError(f"{bundle.path / 'task.json'}: region features {task.get('region_extractor')!r} "
                              f"(D={task.get('region_feature_dim')}) are not this vlsparse's {EXTRACTOR_VERSION!r} "
                              f"(D={REGION_FEATURE_DIM})")
        self.bundle, self.kind, self.runner, self.batch_size = bundle, bundle.kind, runner, int(batch_size)
        self.limits = limits or InputLimits()
        self.answers: list[str] = list(task["answers"])
        stats = [task.get("feature_mean"), task.get("feature_std")]
        self._mean, self._std = (None, None) if None in stats else (np.asarray(s, dtype=np.float32) for s in stats)
        self.max_text_len = min(int(task.get("max_text_len") or 40), int(bundle.config.get("max_position_embeddings", 512)))
        self.tokenizer = load_tokenizer(bundle.path / TOKENIZER_FILE, bundle.config)
        self.tokenizer.enable_truncation(self.max_text_len)
        self.tokenizer.enable_padding(pad_id=0)  # as vlsparse.data.collate: right padding with id 0

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "auto", threads: int | None = None,
             batch_size: int = 32, *, max_image_pixels: int = MAX_IMAGE_PIXELS,
             region_image_side: int = REGION_IMAGE_SIDE, max_question_chars: int = MAX_QUESTION_CHARS) -> "Pipeline":
        """Verify and open a bundle directory (see vlsparse.runtime.bundle); every file is checked here, before
        the first call.

        Args:
            path: the directory written by ``vlsparse export`` (any --format).
            backend: csr bundles: the SparseLinear backend ("auto", "cpu", "dense", "torch-sparse", ...);
                must stay "auto" for onnx bundles.
            threads: CPU threads (torch.set_num_threads for csr; onnxruntime intra-op threads for onnx, and
                the SparseLinear OpenMP threads for onnx-sparse); None keeps the defaults.
            batch_size: questions per model call when called with many questions (>= 1).
            max_image_pixels: images with more pixels are refused, from their header (default 4096 x 4096).
            region_image_side: larger images are down-sampled to this longest side in pixels before region
                extraction (default 1024).
            max_question_chars: longer questions are cut to this many characters before tokenizing (default
                10,000); the tokenizer then keeps task.json's ``max_text_len`` tokens. Cuts are reported.

        Raises:
            FileNotFoundError: ``path`` is not a directory.
            BundleError (a ValueError): missing or altered file, newer or foreign manifest, a path outside the
                bundle or a symlink, no task info or tokenizer in the bundle, region features of another
                extractor version, a file whose contents do not fit (task.json, config.json, tokenizer.json,
                the model file: unreadable, other inputs or outputs); each names the file.
            ValueError: a ``backend`` other than "auto" for an onnx bundle, a limit that is not a positive integer.
            ImportError: a csr bundle where torch is not installed.
        """
        limits = InputLimits(max_image_pixels, region_image_side, max_question_chars)
        bundle = read_bundle(path)
        if bundle.kind != "csr" and backend != "auto":
            raise ValueError(f"backend={backend!r} applies to csr bundles; {bundle.path} is {bundle.kind}")
        # onnxruntime's intra-op threads sleep instead of spin-waiting, as vlsparse.ort_session's default
        runner = load_runner(bundle.kind, bundle.path, threads=threads, spin=False, backend=backend,
                             answers=len(bundle.task.get("answers") or []) or None)
        return cls(bundle, runner, batch_size, limits)

    def _tokenize(self, questions: Sequence[str]) -> tuple[list, list[bool]]:
        """Encodings of the questions (cut to the limits) and, per question, whether it was cut."""
        cut = [cut_question(q, self.limits) for q in questions]
        try:
            enc = self.tokenizer.encode_batch([q for q, _ in cut])
        except Exception as exc:  # tokenizers raises a bare Exception (the probe at load passed: a rare text)
            raise BundleError(f"{self.bundle.path / TOKENIZER_FILE}: the tokenizer fails on this question "
                              f"({str(exc)[:200]})") from None
        return enc, [was_cut or bool(e.overflowing) for (_, was_cut), e in zip(cut, enc)]

    def encode(self, images: Sequence[Image], questions: Sequence[str]) -> dict[str, np.ndarray]:
        """Model inputs for B (image, question) pairs: ``input_ids`` (B, L) int64, ``attention_mask`` (B, L)
        int64, ``img_feat`` (B, 6, 294) float32 (standardised), ``img_pos`` (B, 6, 7) float32,
        ``img_mask`` (B, 6) int64. Questions are cut to the limits (L <= ``max_text_len``).

        Raises:
            ValueError: a question that is not a non-empty string, or an image that is not one or is larger
                than ``limits.max_image_pixels`` (named ``question[i]`` / ``image[i]``, the index left out
                for one pair); FileNotFoundError: an image path that does not exist.
        """
        images, questions = _checked(images, questions, self.limits)
        feats, boxes = zip(*(extract_regions(im) for im in images))
        feat = np.stack(feats)
        if self._mean is not None:
            feat = ((feat - self._mean) / self._std).astype(np.float32)
        enc, _ = self._tokenize(questions)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        check_token_ids(ids, self.bundle.config, self.bundle.path / TOKENIZER_FILE)
        return {"input_ids": ids,
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
                "img_feat": feat, "img_pos": np.stack(boxes),
                "img_mask": np.ones((len(enc), NUM_REGIONS), dtype=np.int64)}

    def logits(self, images: Sequence[Image], questions: Sequence[str]) -> np.ndarray:
        """Answer logits (B, A) float32 for B (image, question) pairs, computed ``batch_size`` at a time;
        always finite.

        Raises: as :meth:`encode`, ValueError for lists of different lengths or no questions, and
        NonFiniteError (a ValueError) when the model gives NaN or Inf (naming the question and the cause).
        """
        images, questions = _checked(images, questions, self.limits)
        parts = []
        for i in range(0, len(questions), self.batch_size):
            inputs = self.encode(images[i:i + self.batch_size], questions[i:i + self.batch_size])
            out = np.asarray(self.runner.logits(inputs), dtype=np.float32)
            finite = all(np.isfinite(inputs[k]).all() for k in ("img_feat", "img_pos"))
            check_finite(out, finite, self.bundle.model_file, first=i, single=len(questions) == 1)
            parts.append(out)
        return np.concatenate(parts)

    def predict(self, images: Image | Sequence[Image], questions: str | Sequence[str],
                top_k: int = 5) -> list[Prediction]:
        """One :class:`Prediction` per question (answers with scores as :meth:`__call__`, and whether the
        question was truncated), for a single pair or lists of B images and questions.

        Raises: as :meth:`__call__` (no warning is issued: the cut is in the result).
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        if isinstance(questions, str):
            images, questions = [images], [questions]
        elif not isinstance(images, (list, tuple)) or not isinstance(questions, (list, tuple)):
            raise ValueError("for many questions pass a list of images and a list of question strings")
        logits = self.logits(images, questions)
        enc, cut = self._tokenize(questions)
        order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
        scores = 0.5 * (1.0 + np.tanh(0.5 * logits.astype(np.float64)))  # sigmoid, no overflow
        return [Prediction([(self.answers[j], float(scores[b, j])) for j in row], cut[b], sum(enc[b].attention_mask))
                for b, row in enumerate(order)]

    def __call__(self, images: Image | Sequence[Image], questions: str | Sequence[str], top_k: int = 5):
        """Top-k answers, best first, as ``[(answer, score), ...]``.

        ``score`` is sigmoid(logit), in [0, 1]: the model is trained with binary cross-entropy per answer
        (UNITER's VQA head), so scores are independent per answer and need not sum to 1. The first answer
        is the arg-max of the logits. A question cut to ``max_text_len`` tokens (or ``max_question_chars``)
        issues a :class:`~vlsparse.runtime.inputs.QuestionTruncated` warning (:meth:`predict` returns the fact).

        Args:
            images: one image (a path, PIL image or (H, W, 3) uint8 array) with ``questions`` a string; or a
                list of B images with ``questions`` a list of B strings.
            questions: the question string, or a list of them.
            top_k: answers to return per question (>= 1; at most the vocabulary size).

        Returns:
            one list of ``min(top_k, len(answers))`` (str, float) pairs, or a list of B such lists.

        Raises:
            ValueError: empty question, non-image input, an image above ``max_image_pixels``, ``top_k`` < 1,
                lists of different lengths; NonFiniteError (a ValueError): the model gave NaN or Inf.
            FileNotFoundError: an image path that does not exist.
        """
        preds = self.predict(images, questions, top_k)
        for i, p in enumerate(preds):
            if p.truncated:
                where = "question" if len(preds) == 1 else f"question[{i}]"
                warnings.warn(QuestionTruncated(f"{where}: truncated to {p.tokens} tokens (max_text_len "
                                                f"{self.max_text_len}); the rest was not read"), stacklevel=2)
        out = [p.answers for p in preds]
        return out[0] if isinstance(questions, str) else out


def answer_report(path: str | os.PathLike, image: Image, question: str, top_k: int = 5) -> dict:
    """Load the bundle at ``path`` and answer one question: what ``vlsparse predict`` prints (``--json``: as is).

    Returns:
        ``answers`` ([{"answer", "score"}], best first), ``latency_ms`` (the call), ``load_ms`` (loading), ``kind``,
        ``model`` (the path), ``truncated`` (bool) and ``warning`` (a sentence when the question was cut, else
        None). Every number is finite (scores are never NaN: :meth:`Pipeline.logits` refuses them).

    Raises: as :meth:`Pipeline.load` and :meth:`Pipeline.predict`.
    """
    t0 = time.perf_counter()
    pipe = Pipeline.load(path)
    t1 = time.perf_counter()
    [pred] = pipe.predict(image, question, top_k=top_k)
    t2 = time.perf_counter()
    note = (f"question truncated to {pred.tokens} tokens (max_text_len {pipe.max_text_len}); the rest was not read"
            if pred.truncated else None)
    return {"answers": [{"answer": a, "score": s} for a, s in pred.answers], "latency_ms": (t2 - t1) * 1e3,
            "load_ms": (t1 - t0) * 1e3, "kind": pipe.kind, "model": str(path), "truncated": pred.truncated,
            "warning": note}
