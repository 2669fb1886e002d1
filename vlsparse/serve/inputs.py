"""What ``POST /v1/predict`` reads, checked against the limits: multipart form or JSON -> :class:`Query`.

Every refusal is an :class:`ApiError` (HTTP status, the field at fault, a one-line message) that the app
turns into a JSON body ``{"error": message, "field": field}``:

    413  body over max_upload_mb (field "body")
    415  a body that is neither multipart/form-data nor application/json ("body")
    400  a body that does not parse as its content type says ("body")
    422  image missing, not an image, not base64, or over max_image_side ("image"); question missing,
         empty, not a string or over max_question_chars ("question"); top_k not an integer >= 1 ("top_k")
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.requests import Request

from vlsparse.serve.settings import Settings

__all__ = ["ApiError", "Query", "read_body", "parse_predict", "decode_image"]


class ApiError(Exception):
    """A refused request: ``status`` (HTTP), ``field`` (the request field at fault, or None), ``message``
    and extra response ``headers`` (e.g. Retry-After)."""

    def __init__(self, status: int, field: Optional[str], message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}


@dataclass
class Query:
    """One checked request: ``image`` (H, W, 3) uint8 RGB, ``question`` (str), ``top_k`` (int >= 1)."""

    image: np.ndarray
    question: str
    top_k: int


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes ``limit`` bytes (Content-Length or counted as it streams).

    Raises:
        ApiError: 413 over the limit.
    """
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, "body", f"request body over the upload limit of {limit} bytes")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _question(value: Any, settings: Settings) -> str:
    if value is None:
        raise ApiError(422, "question", "question is missing")
    if not isinstance(value, str) or not value.strip():
        raise ApiError(422, "question", f"question must be a non-empty string, got {value!r:.60}")
    if len(value) > settings.max_question_chars:
        raise ApiError(422, "question", f"question has {len(value)} characters, over the limit of "
                                        f"{settings.max_question_chars}")
    return value


def _top_k(value: Any, settings: Settings) -> int:
    if value is None or value == "":
        return settings.default_top_k
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(422, "top_k", f"top_k must be an integer >= 1, got {value!r:.60}")
    return value


async def _multipart(request: Request, body: bytes, limit: int) -> tuple[Any, Any, Any]:
    """(image bytes or a non-file value, question, top_k) of a multipart form held in ``body``."""
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=4, max_fields=16, max_part_size=limit)
    except Exception as exc:  # starlette's MultiPartException, or a malformed body
        raise ApiError(400, "body", f"unreadable multipart form: {exc}") from None
    try:
        image = form.get("image")
        if isinstance(image, UploadFile):
            image = await image.read()
        elif image is not None:
            raise ApiError(422, "image", "image must be a file field (multipart), got a text value")
        return image, form.get("question"), form.get("top_k")
    finally:
        await form.close()


def _json(body: bytes) -> tuple[Any, Any, Any]:
    """(image bytes, question, top_k) of a JSON body whose image is base64 (a data: URL prefix is allowed)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "body", f"unreadable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body", "the JSON body must be an object with image, question and optional top_k")
    image = data.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise ApiError(422, "image", "image must be a base64 string")
        if image.startswith("data:"):
            image = image.partition(",")[2]
        try:
            image = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "image", "image is not valid base64") from None
    return image, data.get("question"), data.get("top_k")


async def parse_predict(request: Request, settings: Settings) -> tuple[bytes, str, int]:
    """(image bytes, question, top_k) of a predict request, the question and top_k checked; the image is
    decoded later (:func:`decode_image`, in a thread).

    Raises:
        ApiError: 413, 415, 400 or 422 (see the module).
    """
    body = await read_body(request, settings.max_upload_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        image, question, top_k = await _multipart(request, body, settings.max_upload_bytes)
    elif ctype == "application/json" or ctype.endswith("+json"):
        image, question, top_k = _json(body)
    else:
        raise ApiError(415, "body", f"content type {ctype or 'none'!r}: send multipart/form-data (fields image, "
                                    "question, top_k) or application/json")
    question, top_k = _question(question, settings), _top_k(top_k, settings)
    if not image:
        raise ApiError(422, "image", "image is missing or empty")
    return image, question, top_k


def decode_image(data: bytes, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of encoded image bytes (PNG, JPEG, ... as Pillow reads them), converted
    as vlsparse.data.visual.regions.load_image does; the size is checked from the header, before decoding.

    Raises:
        ApiError: 422 (field "image") when the bytes are not an image or a side is over ``max_side`` pixels.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) > max_side:
                raise ApiError(422, "image", f"image is {im.size[0]}x{im.size[1]} pixels; the limit is "
                                             f"{max_side} pixels per side")
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except ApiError:
        raise
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        raise ApiError(422, "image", f"image is not an image file that Pillow reads ({type(exc).__name__})") from None
