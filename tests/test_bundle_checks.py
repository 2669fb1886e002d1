"""Issue 17, items 2 and 3: a bundle whose manifest matches broken contents is refused at load with one line naming
the file (never a Traceback at the first call), manifest paths stay inside the bundle, and scores are never NaN."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.fixtures.tiny_bundles import ANSWERS, copy_bundle, rehash
from vlsparse import Pipeline
from vlsparse.runtime.bundle import BundleError, read_bundle, sha256

IMAGE = np.full((64, 64, 3), 200, np.uint8)


def refused(path, *fragments, exc=BundleError):
    with pytest.raises(exc) as info:
        Pipeline.load(path)
    msg = str(info.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    return msg


def _task(b):
    return json.loads((b / "task.json").read_text())


def _write(path, data):
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


def _tiny_onnx(path, inputs):
    import onnx
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 5]) for n in inputs]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])
    graph = helper.make_graph([helper.make_node("Identity", [inputs[0]], ["logits"])], "g", ins, [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


CASES = {  # name -> (kind, file, how to break it, message fragments)
    "tokenizer not JSON": ("onnx", "tokenizer.json", lambda p: _write(p, "{not json"), ("tokenizer.json",)),
    "tokenizer JSON but not a tokenizer": ("onnx", "tokenizer.json", lambda p: _write(p, {"a": 1}), ("tokenizer.json",)),
    "3 answers for a 5-answer head": ("onnx", "task.json", lambda p: _write(p, {**_task(p.parent), "answers": ANSWERS[:3]}),
                                       ("task.json", "3 answers", "5")),
    "all-zero feature_std": ("onnx", "task.json", lambda p: _write(p, {**_task(p.parent), "feature_std": [0.0] * 294}),
                             ("task.json", "feature_std")),
    "NaN feature_mean": ("csr", "task.json", lambda p: p.write_text(p.read_text().replace("0.0", "NaN", 1)),
                         ("task.json", "feature_mean", "finite")),
    "max_text_len a string": ("onnx", "task.json", lambda p: _write(p, {**_task(p.parent), "max_text_len": "x"}),
                              ("task.json", "max_text_len")),
    "config size not a number": ("onnx", "config.json",
                                 lambda p: _write(p, {**json.loads(p.read_text()), "max_position_embeddings": "x"}),
                                 ("config.json", "max_position_embeddings")),
    "truncated model.onnx": ("onnx", "model.onnx", lambda p: p.write_bytes(p.read_bytes()[:5000]), ("model.onnx",)),
    "ONNX model with other inputs": ("onnx", "model.onnx", lambda p: _tiny_onnx(p, ["pixels"]), ("model.onnx", "pixels")),
    "truncated model.safetensors": ("csr", "model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:3000]),
                                    ("model.safetensors",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_contents_are_checked_before_the_first_call(tmp_path, case):
    kind, name, breaks, fragments = CASES[case]
    b = copy_bundle(kind, tmp_path / "b")
    breaks(b / name)
    rehash(b, kind)  # the manifest matches: only the contents checks can refuse it
    refused(b, *fragments)


def test_manifest_paths_stay_inside_the_bundle(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    b = copy_bundle("onnx", tmp_path / "b")
    manifest = json.loads((b / "manifest.json").read_text())
    for name in ("../secret.txt", str(outside), "sub/../../secret.txt", "a\\b"):
        files = {**manifest["files"], name: {"sha256": sha256(outside), "bytes": outside.stat().st_size}}
        _write(b / "manifest.json", {**manifest, "files": files})
        with pytest.raises(BundleError, match="not a plain relative path"):
            read_bundle(b)
    _write(b / "manifest.json", {**manifest, "files": {**manifest["files"], "ticket.json": ["not", "an", "entry"]}})
    with pytest.raises(BundleError, match="entry of ticket.json"):
        read_bundle(b)


def test_symlinks_are_refused(tmp_path):
    b = copy_bundle("onnx", tmp_path / "b")
    real = tmp_path / "elsewhere.json"
    real.write_bytes((b / "tokenizer_config.json").read_bytes())
    (b / "tokenizer_config.json").unlink()
    os.symlink(real, b / "tokenizer_config.json")
    rehash(b, "onnx")  # the link's target has the listed bytes
    refused(b, "tokenizer_config.json", "symlink")


def _nan_weights(b, kind):
    if kind == "onnx":
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(b / "model.onnx"))
        init = next(t for t in model.graph.initializer if t.dims and t.dims[-1] == len(ANSWERS))  # the answer layer
        arr = numpy_helper.to_array(init).copy()
        arr.flat[0] = np.nan
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        onnx.save(model, str(b / "model.onnx"))
    else:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(b / "model.safetensors"), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        tensors["vqa_output.3.bias"][0] = float("nan")
        save_file(tensors, str(b / "model.safetensors"), metadata=meta)


@pytest.mark.parametrize("kind", ["onnx", "csr"])
def test_a_nan_weight_is_an_error_naming_the_cause_not_a_nan_score(tmp_path, kind):
    b = copy_bundle(kind, tmp_path / "b")
    _nan_weights(b, kind)
    pipe = Pipeline.load(rehash(b, kind))
    with pytest.raises(ValueError) as info:
        pipe(IMAGE, "what color is it?")
    assert "question: the model gave NaN" in str(info.value) and "weights" in str(info.value), str(info.value)
    with pytest.raises(ValueError, match=r"question\[0\]: the model gave NaN"):
        pipe.logits([IMAGE] * 2, ["is it red?", "what color?"])


def test_cli_prints_one_error_line(tmp_path):
    b = copy_bundle("onnx", tmp_path / "b")
    (b / "tokenizer.json").write_text("{not json")
    rehash(b, "onnx")
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(IMAGE).save(image)
    p = subprocess.run([sys.executable, "-m", "vlsparse.cli", "predict", "--model", str(b), "--image", str(image),
                        "--question", "what color?"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: ") and "tokenizer.json" in p.stderr, p.stderr


def test_a_dense_onnx_bundle_loads_no_custom_library(monkeypatch):
    from tests.fixtures.tiny_bundles import tiny_bundles
    from vlsparse.sparse.kernels import ort as ort_library

    def planted(*a, **k):
        raise AssertionError("a custom-op library was loaded for a dense ONNX bundle")

    monkeypatch.setattr(ort_library, "custom_op_library", planted)
    monkeypatch.setattr(ort_library, "set_num_threads", planted)
    pipe = Pipeline.load(tiny_bundles()["onnx"], threads=1)
    assert [a for a, _ in pipe(IMAGE, "what color?")] and pipe.kind == "onnx"
