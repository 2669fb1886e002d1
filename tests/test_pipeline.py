"""vlsparse.Pipeline and `vlsparse predict` on easy-VQA test images, for every bundle kind.

Reference: the masked PyTorch model fed by the training-time data path (VLDataset + collate: region
features from RegionFeatureCache, standardised with train statistics, questions tokenized by the
transformers tokenizer). The pipeline goes from image files and question strings through the bundle
alone (task.json, tokenizer.json, model file). The model is uniter-tiny with a 70% magnitude mask and
its answer layer fitted by ridge regression on 800 train questions (a few seconds instead of training),
so that it gives varied answers (checked) and the comparison cannot pass by always answering the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vlsparse import Pipeline
from vlsparse.runtime.bundle import BundleError
from vlsparse.export.exporters import export_onnx
from vlsparse.pruning.mask import ones_mask

easy_vqa = pytest.importorskip("easy_vqa")

from tests.fixtures.bundles import KINDS, N_TEST, shared_easy_bundles  # noqa: E402  (needs easy_vqa)


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    return shared_easy_bundles(tmp_path_factory)


@pytest.fixture(scope="module")
def pipes(easy):
    # one model call for all questions: OpenMP and onnxruntime threads that spin-wait on a busy shared
    # CPU make many small calls slow, and speed is not what these tests are about
    return {kind: Pipeline.load(easy.bundles[kind], batch_size=N_TEST) for kind in KINDS}


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def same(a, b):
    """Equal answers in the same order, scores equal up to float rounding (padding to another length in a
    batch changes the float sums slightly)."""
    return [x for x, _ in a] == [x for x, _ in b] and np.allclose([s for _, s in a], [s for _, s in b], atol=1e-5)


def check_against_reference(easy, results, k):
    """results: per question, the top-k (answer, score) pairs; scores are sigmoid of the reference logits."""
    assert len(results) == N_TEST
    order = np.argsort(-easy.ref, axis=1)[:, :k]
    for row, res in zip(order, results):
        assert [a for a, _ in res] == [easy.answers[j] for j in row]
    got = np.array([[s for _, s in res] for res in results])
    np.testing.assert_allclose(got, np.take_along_axis(sigmoid(easy.ref), order, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_answers_equal_the_masked_model(easy, pipes, kind):
    pipe = pipes[kind]
    assert pipe.kind == kind and pipe.answers == easy.answers
    check_against_reference(easy, pipe(easy.images, easy.questions, top_k=3), 3)


def test_image_forms_single_call_and_top_k(easy, pipes):
    from PIL import Image

    pipe = pipes["onnx"]
    path, q = easy.images[0], easy.questions[0]
    with Image.open(path) as im:
        pil = im.copy()
    arr = np.asarray(pil.convert("RGB"))
    first = pipe(path, q)
    assert len(first) == 5 and all(isinstance(a, str) and isinstance(s, float) for a, s in first)
    assert pipe(pil, q) == first and pipe(arr, q) == first
    assert same(pipe(easy.images[:4], easy.questions[:4])[0], first)
    everything = pipe(arr, q, top_k=100)
    assert sorted(a for a, _ in everything) == sorted(easy.answers)
    scores = [s for _, s in everything]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    small = Pipeline.load(easy.bundles["onnx"], batch_size=7)  # chunked calls give the same answers
    assert all(map(same, small(easy.images[:20], easy.questions[:20]), pipe(easy.images[:20], easy.questions[:20])))


def test_bad_inputs_name_the_problem(easy, pipes, tmp_path):
    pipe = pipes["csr"]
    img, q = easy.images[0], easy.questions[0]
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cases = [
        (lambda: pipe(img, ""), ValueError, "question: expected a non-empty string"),
        (lambda: pipe(img, "   "), ValueError, "question"),
        (lambda: pipe([img, img], [q, ""]), ValueError, "question[1]"),
        (lambda: pipe(text, q), ValueError, "notes.png"),
        (lambda: pipe(tmp_path / "gone.png", q), FileNotFoundError, "gone.png"),
        (lambda: pipe(np.zeros((8, 8), np.uint8), q), ValueError, "(H, W, 3) uint8"),
        (lambda: pipe(np.zeros((8, 8, 3), np.float32), q), ValueError, "float32"),
        (lambda: pipe(b"\x89PNG", q), ValueError, "bytes"),
        (lambda: pipe(img, q, top_k=0), ValueError, "top_k"),
        (lambda: pipe([img], [q, q]), ValueError, "1 images and 2 questions"),
    ]
    for call, exc, fragment in cases:
        with pytest.raises(exc) as info:
            call()
        assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="csr bundles"):
        Pipeline.load(easy.bundles["onnx"], backend="cpu")


def test_refuses_bundles_it_cannot_use(easy, tmp_path, tiny_model):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(easy.bundles["onnx-sparse"], bad)
    (bad / "model.onnx").write_bytes((bad / "model.onnx").read_bytes()[:-10])
    with pytest.raises(BundleError, match="model.onnx: checksum mismatch"):
        Pipeline.load(bad)
    mask = ones_mask(tiny_model, tiny_model.prune_scope())
    plain = export_onnx(tiny_model, mask, tmp_path / "plain")  # no task info, no tokenizer
    with pytest.raises(BundleError, match="task.json: missing"):
        Pipeline.load(plain)


def test_cli_predict(easy, pipes):
    from typer.testing import CliRunner

    from vlsparse.cli import app

    args = ["predict", "--model", str(easy.bundles["onnx-sparse"]), "--image", easy.images[0],
            "--question", easy.questions[0], "--top-k", "3"]
    expected = pipes["onnx-sparse"](easy.images[0], easy.questions[0], top_k=3)
    r = CliRunner().invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert same([(d["answer"], d["score"]) for d in out["answers"]], expected)
    assert out["kind"] == "onnx-sparse" and out["latency_ms"] > 0
    r = CliRunner().invoke(app, args)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 0 and [l.split()[1] for l in lines[:3]] == [a for a, _ in expected]
    assert lines[3].startswith("latency ") and " ms " in lines[3]


BLOCKER = """
import sys

class _NoTorch:  # this interpreter has no torch, transformers, onnx or safetensors
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "transformers", "onnx", "safetensors"}:
            raise ImportError(f"{name} is blocked: the no-torch runtime test")
        return None

sys.meta_path.insert(0, _NoTorch())
"""

SCRIPT = """
import json, sys
import vlsparse
args = json.load(open(sys.argv[1]))
out = {}
for kind, path in args["bundles"].items():
    pipe = vlsparse.Pipeline.load(path, batch_size=len(args["questions"]))
    out[kind] = pipe(args["images"], args["questions"], top_k=3)
blocked = sorted(m for m in sys.modules if m.partition(".")[0] in {"torch", "transformers", "onnx", "safetensors"})
print(json.dumps({"results": out, "blocked_modules_loaded": blocked}))
"""


def test_onnx_bundles_run_without_torch(easy, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               PYTHONWARNINGS="ignore")

    def python(*args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)

    probe = python("-c", "import torch")
    assert probe.returncode != 0 and "blocked" in probe.stderr  # the blocker works
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"bundles": {"onnx-sparse": str(easy.bundles["onnx-sparse"])},
                                "images": easy.images, "questions": easy.questions}))
    (tmp_path / "script.py").write_text(SCRIPT)
    p = python(str(tmp_path / "script.py"), str(args))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["blocked_modules_loaded"] == []
    check_against_reference(easy, [[tuple(x) for x in res] for res in out["results"]["onnx-sparse"]], 3)

    # the CLI too: answers, and a user error as one line with exit code 2
    cli = ["-m", "vlsparse.cli", "predict", "--model", str(easy.bundles["onnx-sparse"]), "--image", easy.images[0]]
    p = python(*cli, "--question", easy.questions[0], "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["answers"][0]["answer"] == easy.answers[int(easy.ref[0].argmax())]
    p = python(*cli, "--question", "")
    assert p.returncode == 2 and p.stderr.strip() == "error: question: expected a non-empty string, got ''", p.stderr


def test_example_app_runs(easy, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "easy_vqa_app.py"
    spec = importlib.util.spec_from_file_location("easy_vqa_app", path)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    accuracy = app.main([str(easy.bundles["onnx"]), "--questions", "40", "--show", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{easy.bundles['onnx']}: onnx bundle, sparsity 70%") and len(lines) == 5
    assert lines[-1].startswith(f"accuracy on 40 test questions: {accuracy:.1%}")
    assert 0.25 < accuracy <= 1.0  # the fitted tiny model is far better than chance (1/13), like the reference
