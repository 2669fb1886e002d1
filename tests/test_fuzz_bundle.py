"""Issue 17: property-based fuzzing of what a bundle's JSON files may hold: manifest.json (structure-aware
mutations and damaged bytes), and config.json, task.json, ticket.json and tokenizer.json with a manifest that
matches them. ``read_bundle`` and then ``Pipeline`` (on a stub model that answers zeros) must give a result or a
ValueError / FileNotFoundError naming the file (see tests/fuzzing.py)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fixtures.tiny_bundles import TASK
from tests.fuzzing import json_file_contents, own_errors_only, write_files
from vlsparse.runtime.bundle import read_bundle, write_bundle
from vlsparse.runtime.pipeline import Pipeline


def _tokenizer_json() -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "what", "color", "?", "red"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)])
    return json.loads(tok.to_str())


CONFIG = {"model_type": "uniter", "num_answers": 5, "img_dim": 294, "max_position_embeddings": 64, "vocab_size": 30,
          "task_head": "answer"}
FILES = {"config.json": CONFIG, "task.json": TASK, "ticket.json": {"sparsity": 0.5, "model": "uniter-tiny"},
         "tokenizer.json": _tokenizer_json()}
IMAGE = np.zeros((16, 16, 3), np.uint8)


class _ZeroModel:
    """A stand-in runner: zero logits for as many answers as task.json lists."""

    def __init__(self, answers: int):
        self.answers = answers

    def logits(self, inputs):
        return np.zeros((len(inputs["input_ids"]), self.answers), np.float32)


def _bundle(root: Path, files: dict[str, bytes]) -> Path:
    write_files(root, {"model.onnx": b"stand-in", **files})
    write_bundle(root, "onnx")
    return root


def _valid() -> dict[str, bytes]:
    return {name: json.dumps(doc).encode() for name, doc in FILES.items()}


def _use(path: Path):
    bundle = read_bundle(path)
    pipe = Pipeline(bundle, _ZeroModel(len(bundle.task.get("answers") or [])))
    return pipe(IMAGE, "what color ?")


def test_the_valid_stand_in_bundle_answers():
    with tempfile.TemporaryDirectory() as d:
        assert [a for a, _ in _use(_bundle(Path(d), _valid()))] == TASK["answers"]


_MANIFEST = {"format": "vlsparse-bundle-1", "kind": "onnx", "vlsparse_version": "0.1.0",
             "files": {"config.json": {"sha256": "0" * 64, "bytes": 1}}}


@given(json_file_contents(_MANIFEST))
@example(json.dumps({**_MANIFEST, "kind": []}).encode())  # found by the long profile: an unhashable kind
def test_manifest_reader_raises_only_its_own_errors(data):
    with tempfile.TemporaryDirectory() as d:
        root = _bundle(Path(d), _valid())
        real = json.loads((root / "manifest.json").read_text())
        data = data.replace(json.dumps(_MANIFEST["files"]).encode(), json.dumps(real["files"]).encode())
        (root / "manifest.json").write_bytes(data)
        own_errors_only(lambda: read_bundle(root), ["manifest.json", root])


@st.composite
def _damaged_file(draw):
    name = draw(st.sampled_from(sorted(FILES)))
    return name, draw(json_file_contents(FILES[name]))


@given(_damaged_file())
def test_bundle_contents_raise_only_their_own_errors(case):
    name, data = case
    with tempfile.TemporaryDirectory() as d:
        root = _bundle(Path(d), {**_valid(), name: data})
        result = own_errors_only(lambda: _use(root), [name, root])
        if result is not None:
            assert all(0.0 <= s <= 1.0 for _, s in result)
