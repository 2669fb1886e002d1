"""Images as ViLT reads them: resized, rescaled and normalised by transformers' ViltImageProcessor.

ViLT (Kim et al. 2021) takes raw pixels instead of region features. :class:`PixelImages` runs every
image once through ``ViltImageProcessorPil`` (the PIL backend of transformers'
``ViltImageProcessor``, pinned so that the pixels do not depend on whether torchvision is
installed): the shorter edge is resized to ``image_size`` (bicubic), the longer one to at most
1333/800 of that, both rounded down to multiples of 32. The resized images are kept as uint8 (a
quarter of the memory of float32); rescaling (x / 255) and normalisation ((x - 0.5) / 0.5 per
channel) are applied when an image is read, and equal the processor's own float output to 1e-7.
Padding to a common size (pixel_mask 0 on the padding) happens in :func:`vlsparse.data.dataset.collate`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterator, Mapping

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["PixelImages", "image_processor"]


def image_processor(image_size: int, **kw):
    """transformers' ViLT image processor (PIL backend) with shortest edge ``image_size`` pixels.

    Raises:
        ValueError: ``image_size`` is not a positive multiple of 32.
    """
    # transformers' image processing takes seconds to import: only the pixel (ViLT) path pays for it, not
    # every user of vlsparse.data.dataset (which imports this module) on region features.
    from transformers import ViltImageProcessorPil

    if image_size < 32 or image_size % 32:
        raise ValueError(f"image_size must be a positive multiple of 32 (ViLT's size_divisor), got {image_size}")
    return ViltImageProcessorPil(size={"shortest_edge": image_size}, **kw)


class PixelImages(Mapping):
    """image_id -> ``(pixel_values (3, H, W) float32, pixel_mask (H, W) int64)``, as ViltImageProcessor makes them.

    Args:
        paths: image_id -> image file (any format Pillow reads; converted to RGB).
        image_size: shortest edge after resizing, in pixels (a multiple of 32).

    Raises:
        ValueError: bad ``image_size``, or an image file that cannot be read (the message names it).
        FileNotFoundError: a missing image file.
    """

    def __init__(self, paths: Mapping[Hashable, str | os.PathLike], image_size: int):
        self.image_size = image_size
        self.processor = image_processor(image_size)
        resize = image_processor(image_size, do_rescale=False, do_normalize=False, do_pad=False)
        self._raw: dict[Hashable, torch.Tensor] = {}
        for key, path in paths.items():
            try:
                with Image.open(path) as im:
                    pixels = resize(im.convert("RGB"), return_tensors="np")["pixel_values"][0]
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: image file not found") from None
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise ValueError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
            self._raw[key] = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8))
        p = self.processor
        self._scale = torch.tensor(p.rescale_factor, dtype=torch.float64)
        self._mean = torch.tensor(p.image_mean, dtype=torch.float64)[:, None, None]
        self._std = torch.tensor(p.image_std, dtype=torch.float64)[:, None, None]

    def __getitem__(self, key: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self._raw[key]
        values = ((raw.double() * self._scale - self._mean) / self._std).float()
        return values, torch.ones(raw.shape[1:], dtype=torch.int64)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def processor_config(self) -> dict:
        """The full processor's settings (JSON-able; ``ViltImageProcessor(**config)`` rebuilds it)."""
        return json.loads(self.processor.to_json_string())
