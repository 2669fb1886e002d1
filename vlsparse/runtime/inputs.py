"""Bounded inputs for :class:`vlsparse.Pipeline`: images checked from their header and down-sampled, and
questions cut to a bounded length with the fact reported.

Images (:func:`image_array`): a path is opened lazily (Pillow reads the size from the file header) and
refused before decoding when it has more than ``max_pixels`` pixels (default :data:`MAX_IMAGE_PIXELS`,
4096 x 4096 = 16.7 Mpx): a 41 KB PNG can declare 12000 x 12000 pixels, 432 MB decoded. The same bound
replaces Pillow's decompression-bomb warning (above 89 Mpx); Pillow still refuses images above 179 Mpx
when they are opened, which is reported the same way. JPEGs are
decoded at a reduced scale where that still leaves the longest side >= ``side``. Arrays and PIL images
are checked the same way. Every image larger than ``side`` (default :data:`REGION_IMAGE_SIDE`, 1024
pixels) on its longest side is then down-sampled, nearest neighbour (it keeps the exact colours that the
region extractor's background and foreground rule compares), to that side before region extraction, so
the extractor's memory is bounded by about ``side`` squared times 40 bytes (50 MB at 1024).

Questions (:func:`cut_question`): a question longer than ``max_chars`` characters (default
:data:`MAX_QUESTION_CHARS`, 10,000) is cut to that length before tokenizing; the tokenizer then cuts to
the bundle's ``max_text_len`` tokens. Either cut is reported (:class:`QuestionTruncated`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

__all__ = ["MAX_IMAGE_PIXELS", "REGION_IMAGE_SIDE", "MAX_QUESTION_CHARS", "InputLimits", "QuestionTruncated",
           "image_array", "cut_question"]

#: images with more pixels than this are refused (4096 x 4096)
MAX_IMAGE_PIXELS = 4096 * 4096
#: images are down-sampled to at most this many pixels on their longest side before region extraction
REGION_IMAGE_SIDE = 1024
#: questions are cut to this many characters before tokenizing
MAX_QUESTION_CHARS = 10_000


@dataclass(frozen=True)
class InputLimits:
    """The input bounds of a Pipeline (see the module docstring).

    Raises:
        ValueError: a bound that is not a positive integer.
    """

    max_image_pixels: int = MAX_IMAGE_PIXELS
    region_image_side: int = REGION_IMAGE_SIDE
    max_question_chars: int = MAX_QUESTION_CHARS

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "region_image_side", "max_question_chars"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


class QuestionTruncated(UserWarning):
    """A question was cut to the model's text length (or to ``max_question_chars``): part of it was not read."""


def _too_large(w: int, h: int, limits: InputLimits, where: str) -> ValueError:
    return ValueError(f"{where}: {w} x {h} pixels ({w * h / 1e6:.1f} Mpx) is more than the limit of "
                      f"{limits.max_image_pixels / 1e6:.1f} Mpx (max_image_pixels); down-scale the image first")


def _shrink(im: PILImage.Image, side: int) -> PILImage.Image:
    w, h = im.size
    if max(w, h) <= side:
        return im
    scale = side / max(w, h)
    return im.resize((max(1, round(w * scale)), max(1, round(h * scale))), PILImage.Resampling.NEAREST)


def _open_path(path: Path, limits: InputLimits, where: str) -> np.ndarray:
    if path.is_dir():
        raise ValueError(f"{where}: {os.fspath(path)} is a directory, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{where}: file {os.fspath(path)} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # our limit decides, just below
            with PILImage.open(path) as im:  # lazy: the header only
                w, h = im.size
                if w * h > limits.max_image_pixels:
                    raise _too_large(w, h, limits, where)
                if im.format == "JPEG":
                    im.draft("RGB", (limits.region_image_side, limits.region_image_side))
                im.load()
                return np.asarray(_shrink(im.convert("RGB"), limits.region_image_side), dtype=np.uint8)
    except ValueError as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: cannot read image {os.fspath(path)}: {e}") from None
    except PILImage.DecompressionBombError as e:  # beyond twice Pillow's own limit (179 Mpx): refused at open
        raise ValueError(f"{where}: {os.fspath(path)} is more than the limit of {limits.max_image_pixels / 1e6:.1f} "
                         f"Mpx (max_image_pixels): {e}") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, DecompressionBomb*, struct.error, ...
        raise ValueError(f"{where}: cannot read image {os.fspath(path)}: {type(e).__name__}: {e}") from None


def image_array(image: Any, where: str, limits: InputLimits = InputLimits()) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of a path, PIL image or (H, W, 3) uint8 array, at most
    ``limits.region_image_side`` pixels on its longest side.

    Raises:
        ValueError: more than ``limits.max_image_pixels`` pixels, a directory, a file that is not an image,
            an array of another shape or dtype, another type (naming ``where``).
        FileNotFoundError: a path that does not exist.
    """
    if isinstance(image, (str, os.PathLike)):
        return _open_path(Path(image), limits, where)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise ValueError(f"{where}: expected an (H, W, 3) uint8 array, got shape {image.shape} dtype {image.dtype}")
        h, w = image.shape[:2]
        if w * h > limits.max_image_pixels:
            raise _too_large(w, h, limits, where)
        if max(h, w) <= limits.region_image_side:
            return image
        return np.asarray(_shrink(PILImage.fromarray(image), limits.region_image_side), dtype=np.uint8)
    if isinstance(image, PILImage.Image):
        w, h = image.size
        if w * h > limits.max_image_pixels:
            raise _too_large(w, h, limits, where)
        return np.asarray(_shrink(image.convert("RGB"), limits.region_image_side), dtype=np.uint8)
    raise ValueError(f"{where}: expected an image path, a PIL image or an (H, W, 3) uint8 array, "
                     f"got {type(image).__name__}")


def cut_question(question: str, limits: InputLimits) -> tuple[str, bool]:
    """``(question cut to limits.max_question_chars characters, whether it was cut)``."""
    if len(question) <= limits.max_question_chars:
        return question, False
    return question[:limits.max_question_chars], True
