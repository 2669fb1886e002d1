"""Issue 17, items 5 and 7: bounded inputs of vlsparse.Pipeline. Images are refused from their header beyond
max_image_pixels (before decoding) and down-sampled before region extraction; a directory given as an image says
so; a question cut to the model's text length is reported."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.fixtures.tiny_bundles import tiny_bundles
from vlsparse import Pipeline

SMALL = np.zeros((64, 64, 3), np.uint8)
SMALL[10:40, 20:50] = (250, 30, 30)  # a red rectangle on black


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(tiny_bundles()["onnx"])


def _png_header_only(path, width, height):
    """A PNG that declares width x height pixels and holds (almost) no data: 60 bytes on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) +
                     chunk(b"IEND", b""))
    return path


def test_a_huge_image_is_refused_from_its_header_before_decoding(pipe, tmp_path, monkeypatch):
    bomb = _png_header_only(tmp_path / "bomb.png", 12000, 12000)

    def no_decoding(self, *a, **k):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ValueError) as info:
        pipe(bomb, "what color?")
    msg = str(info.value)
    assert msg.startswith("image: 12000 x 12000 pixels (144.0 Mpx)") and "16.8 Mpx (max_image_pixels)" in msg, msg
    big = np.broadcast_to(np.zeros(3, np.uint8), (5000, 5000, 3))  # arrays are bounded too (a view: no memory)
    with pytest.raises(ValueError, match=r"image: 5000 x 5000 pixels"):
        pipe(big, "what color?")
    with pytest.raises(ValueError, match=r"image: 12000 x 12000 pixels"):
        pipe(Image.new("1", (12000, 12000)), "what color?")


def test_the_pixel_limit_is_an_option(tmp_path):
    small = Pipeline.load(tiny_bundles()["onnx"], max_image_pixels=32 * 32)
    with pytest.raises(ValueError, match=r"64 x 64 pixels .* limit of 0.0 Mpx"):
        small(SMALL, "what color?")
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
        Pipeline.load(tiny_bundles()["onnx"], max_image_pixels=0)


def test_large_images_are_down_sampled_before_region_extraction(tmp_path):
    pipe = Pipeline.load(tiny_bundles()["onnx"], region_image_side=64)
    big = SMALL.repeat(16, axis=0).repeat(16, axis=1)  # 1024 x 1024, each pixel a 16 x 16 block
    Image.fromarray(big).save(tmp_path / "big.png")
    expected = pipe.encode([SMALL], ["what color?"])
    for image in (big, tmp_path / "big.png", Image.fromarray(big)):
        got = pipe.encode([image], ["what color?"])  # nearest neighbour to 64 x 64: the small image again
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])


def test_a_directory_is_not_a_missing_file(pipe, tmp_path):
    with pytest.raises(ValueError, match=r"image: .* is a directory, not an image file"):
        pipe(tmp_path, "what color?")
    with pytest.raises(FileNotFoundError, match="gone.png not found"):
        pipe(tmp_path / "gone.png", "what color?")


def test_a_truncated_question_is_reported(pipe):
    long = " ".join(["what"] * 5000) + " color is the shape?"
    [short_pred, long_pred] = pipe.predict([SMALL, SMALL], ["what color?", long])
    assert not short_pred.truncated and short_pred.tokens == 5  # [CLS] what color ? [SEP]
    assert long_pred.truncated and long_pred.tokens == pipe.max_text_len == 12
    with pytest.warns(UserWarning, match=r"question\[1\]: truncated to 12 tokens \(max_text_len 12\)"):
        pipe([SMALL, SMALL], ["what color?", long])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = pipe(SMALL, "what color?")  # no warning when nothing is cut
    assert [a for a, _ in got] == [a for a, _ in short_pred.answers]


def test_questions_are_cut_to_max_question_chars_before_tokenizing():
    pipe = Pipeline.load(tiny_bundles()["onnx"], max_question_chars=8)
    [pred] = pipe.predict(SMALL, "red red red")  # 3 words fit in 12 tokens, but not in 8 characters
    assert pred.truncated and pred.tokens == 4  # [CLS] red red [SEP]
