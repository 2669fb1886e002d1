"""`vlsparse serve` (vlsparse.serve): the batcher alone, the HTTP API through a client, and the real process.

References are independent of the server: `vlsparse.Pipeline` called directly on the same image files and
questions (answers equal, scores to float rounding: a batch pads questions to another length), the sha256 of
manifest.json computed here, and counts written by hand. The bundles are the fitted 70% uniter-tiny exports of
tests/fixtures/bundles.py (shared with test_pipeline). No assertion depends on timing: batches are made
deterministic with a long --max-wait-ms, so that they form only when max-batch requests wait, or on a drain.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("httpx", reason="httpx (the test client) is part of the dev extra")
pytest.importorskip("easy_vqa")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from tests.fixtures.bundles import shared_easy_bundles  # noqa: E402
from tests.test_pipeline import BLOCKER  # noqa: E402  (the meta-path hook that makes `import torch` fail)
from vlsparse import Pipeline  # noqa: E402
from vlsparse.serve import Settings, create_app  # noqa: E402
from vlsparse.serve.batching import Batcher, BatcherClosed, QueueFull  # noqa: E402

KIND = "onnx-sparse"
LONG_WAIT_MS = 600_000.0  # a batch then forms only when max_batch requests wait, or on a drain


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    return shared_easy_bundles(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(easy):
    return Pipeline.load(easy.bundles[KIND], threads=1)


def client(pipe, **options) -> TestClient:
    """A test client (use it as a context manager: that runs the app's lifespan) for an app with ``options``."""
    return TestClient(create_app(pipe, Settings(threads=1, **options)), raise_server_exceptions=False)


def post_file(c: TestClient, image: str, question: str, **fields):
    with open(image, "rb") as f:
        return c.post("/v1/predict", files={"image": ("image.png", f.read(), "image/png")},
                      data={"question": question, **{k: str(v) for k, v in fields.items()}})


def pairs(response_json) -> list[tuple[str, float]]:
    return [(a["answer"], a["score"]) for a in response_json["answers"]]


def same(got, expected) -> bool:
    """Same answers in the same order, scores equal up to float rounding."""
    return [a for a, _ in got] == [a for a, _ in expected] and np.allclose(
        [s for _, s in got], [s for _, s in expected], atol=1e-5, rtol=0)


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def wait_until(condition, what: str, limit_s: float = 120.0):
    """Poll ``condition`` until it holds (a wait, not a timed assertion: the limit only avoids hanging)."""
    end = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def distinct_cases(easy, n: int) -> list[int]:
    """Indices of n test questions, all different, with as many different reference answers as possible (at
    least 4 for n >= 4: a telling test)."""
    answer = [int(easy.ref[i].argmax()) for i in range(len(easy.questions))]
    seen_q, seen_a, out = set(), set(), []
    for new_answers_only in (True, False):
        for i, q in enumerate(easy.questions):
            if len(out) < n and q not in seen_q and not (new_answers_only and answer[i] in seen_a):
                seen_q.add(q)
                seen_a.add(answer[i])
                out.append(i)
    assert len(out) == n and len(seen_a) >= min(n, 4)
    return out


# -- the batcher alone -------------------------------------------------------------------------------------


def test_batcher_groups_items_and_matches_results():
    sizes, seen = [], []

    def run(items):
        seen.append(list(items))
        return [x * 10 for x in items]

    async def scenario():
        b = Batcher(run, max_batch=4, max_wait_s=LONG_WAIT_MS, max_queue=100, on_batch=sizes.append)
        with pytest.raises(BatcherClosed):
            b.submit(0)  # not started
        await b.start()
        futures = [b.submit(i) for i in range(10)]
        assert b.depth == 10
        futures[3].cancel()  # a request that timed out before its batch: dropped
        await b.close()  # runs everything waiting, without waiting for fuller batches
        with pytest.raises(BatcherClosed):
            b.submit(1)
        return [None if f.cancelled() else f.result() for f in futures]

    results = asyncio.run(scenario())
    assert results == [0, 10, 20, None, 40, 50, 60, 70, 80, 90]
    assert seen == [[0, 1, 2, 4], [5, 6, 7, 8], [9]] and sizes == [4, 4, 1]


def test_batcher_isolates_a_failing_item_and_limits_the_queue():
    def run(items):
        if "bad" in items:
            raise ValueError("bad item")
        return [s.upper() for s in items]

    async def scenario():
        b = Batcher(run, max_batch=8, max_wait_s=LONG_WAIT_MS, max_queue=3)
        await b.start()
        futures = [b.submit(s) for s in ("a", "bad", "c")]
        with pytest.raises(QueueFull):
            b.submit("d")
        b.drain_soon()
        done = await asyncio.gather(*futures, return_exceptions=True)
        await b.close()
        return done

    a, bad, c = asyncio.run(scenario())
    assert (a, c) == ("A", "C") and isinstance(bad, ValueError) and str(bad) == "bad item"


def test_batcher_runs_batches_off_the_event_loop():
    gate = threading.Event()

    def run(items):  # blocks until a coroutine on the event loop opens the gate: a blocked loop would never
        return [gate.wait(60)] * len(items)

    async def scenario():
        b = Batcher(run, max_batch=1, max_wait_s=0.0, max_queue=4)
        await b.start()
        future = b.submit("x")
        while not b.in_flight:
            await asyncio.sleep(0.001)
        gate.set()  # the loop runs while the batch computes in its thread
        result = await future
        await b.close()
        return result

    assert asyncio.run(scenario()) is True


# -- the HTTP API ------------------------------------------------------------------------------------------


def test_predict_equals_the_pipeline_in_both_body_forms(easy, pipe):
    manifest_id = hashlib.sha256((easy.bundles[KIND] / "manifest.json").read_bytes()).hexdigest()
    with client(pipe) as c:
        for i in distinct_cases(easy, 4):
            image, question = easy.images[i], easy.questions[i]
            r = post_file(c, image, question, top_k=3)
            assert r.status_code == 200, r.text
            assert same(pairs(r.json()), pipe(image, question, top_k=3))
            assert r.json()["bundle_id"] == manifest_id and r.json()["latency_ms"] > 0
            with open(image, "rb") as f:
                encoded = base64.b64encode(f.read()).decode()
            r = c.post("/v1/predict", json={"image": "data:image/png;base64," + encoded, "question": question})
            assert r.status_code == 200 and same(pairs(r.json()), pipe(image, question, top_k=5))  # default top_k 5
        everything = post_file(c, easy.images[0], easy.questions[0], top_k=99).json()
        assert sorted(a for a, _ in pairs(everything)) == sorted(easy.answers)


def test_twenty_concurrent_requests_each_get_their_own_answer(easy, pipe):
    cases = distinct_cases(easy, 20)
    top_ks = [1 + i % 4 for i in range(20)]
    with client(pipe, max_batch=20, max_wait_ms=LONG_WAIT_MS) as c:
        with ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(lambda j: post_file(c, easy.images[cases[j]], easy.questions[cases[j]],
                                                          top_k=top_ks[j]), range(20)))
        text = c.get("/metrics").text
    for j, r in enumerate(responses):
        assert r.status_code == 200, r.text
        assert r.json()["batch_size"] == 20  # one batch: it forms only when all 20 wait
        i = cases[j]
        assert same(pairs(r.json()), pipe(easy.images[i], easy.questions[i], top_k=top_ks[j]))
    assert len({r.json()["answers"][0]["answer"] for r in responses}) >= 4
    assert metric(text, "vlsparse_batch_size_count") == 1 and metric(text, "vlsparse_batch_size_sum") == 20


def test_model_health_schema_page_and_metrics(easy, pipe):
    with client(pipe) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        info = c.get("/v1/model").json()
        assert (info["model"], info["task"], info["format"], info["answers"]) == (
            "uniter-tiny", "easy-vqa", KIND, easy.answers)
        assert info["sparsity"] == pytest.approx(0.7) and info["limits"]["max_upload_bytes"] == 10_000_000
        schema = c.get("/openapi.json").json()
        body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
        assert set(body) == {"multipart/form-data", "application/json"}
        assert {"/v1/model", "/healthz"} <= set(schema["paths"])
        assert c.get("/docs").status_code == 200
        page = c.get("/")
        assert page.headers["content-type"].startswith("text/html")
        assert all(f'id="{x}"' in page.text for x in ("image", "question", "ask", "answers", "latency"))
        assert post_file(c, easy.images[0], easy.questions[0]).status_code == 200
        assert post_file(c, easy.images[0], "").status_code == 422
        assert c.get("/no/such/page").json()["error"] == "Not Found"
        text = c.get("/metrics").text
    assert metric(text, "vlsparse_requests_total", endpoint="/v1/predict", status="200") == 1
    assert metric(text, "vlsparse_requests_total", endpoint="/v1/predict", status="422") == 1
    assert metric(text, "vlsparse_requests_total", endpoint="/healthz", status="200") == 1
    assert metric(text, "vlsparse_requests_total", endpoint="other", status="404") == 1
    assert metric(text, "vlsparse_request_latency_seconds_count") == 2
    assert metric(text, "vlsparse_batch_size_count") == 1 and metric(text, "vlsparse_queue_depth") == 0


def test_every_limit_and_bad_request_gets_a_4xx_naming_the_field(easy, pipe, tmp_path):
    from PIL import Image

    image, question = easy.images[0], easy.questions[0]
    png = open(image, "rb").read()
    big = io.BytesIO()
    Image.new("RGB", (65, 20), (200, 30, 30)).save(big, format="PNG")
    cases = [  # (request, status, field)
        (dict(files={"image": ("a.png", png + b"\0" * 3000)}, data={"question": question}), 413, "body"),
        (dict(content=png * 3, headers={"content-type": "application/json"}), 413, "body"),
        (dict(files={"image": ("a.png", png)}, data={"question": "x" * 41}), 422, "question"),
        (dict(files={"image": ("a.png", png)}, data={"question": "   "}), 422, "question"),
        (dict(files={"image": ("a.png", png)}), 422, "question"),
        (dict(files={"image": ("a.png", big.getvalue())}, data={"question": question}), 422, "image"),
        (dict(files={"image": ("a.png", b"not an image")}, data={"question": question}), 422, "image"),
        (dict(files={"other": ("x.txt", b"x")}, data={"question": question, "image": "text"}), 422, "image"),
        (dict(json={"question": question}), 422, "image"),
        (dict(json={"image": "***", "question": question}), 422, "image"),
        (dict(json={"image": base64.b64encode(png).decode(), "question": 7}), 422, "question"),
        (dict(json={"image": base64.b64encode(png).decode(), "question": question, "top_k": 0}), 422, "top_k"),
        (dict(files={"image": ("a.png", png)}, data={"question": question, "top_k": "two"}), 422, "top_k"),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "body"),
        (dict(json=["a list"]), 400, "body"),
        (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "body"),
    ]
    with client(pipe, max_upload_mb=len(png) * 2.5 / 1e6, max_question_chars=40, max_image_side=64) as c:
        for request, status, field in cases:
            r = c.post("/v1/predict", **request)
            assert (r.status_code, r.json()["field"]) == (status, field), (request.keys(), r.text)
            assert r.json()["error"] and "\n" not in r.json()["error"]
        r = post_file(c, image, question)  # the server still answers
        assert r.status_code == 200 and same(pairs(r.json()), pipe(image, question, top_k=5))


def test_full_queue_gets_503_with_retry_after_and_timeouts_get_504(easy, pipe):
    image, question = easy.images[0], easy.questions[0]
    with client(pipe, max_batch=8, max_wait_ms=LONG_WAIT_MS, max_queue=2) as c:
        def depth():  # read by the app, in its event loop
            return metric(c.get("/metrics").text, "vlsparse_queue_depth")

        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(post_file, c, image, question) for _ in range(2)]
            wait_until(lambda: depth() == 2, "two queued requests")
            r = post_file(c, image, question)
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "waiting" in r.json()["error"]
            assert depth() == 2
            c.app.state.batcher.drain_soon()  # thread-safe
            done = [f.result() for f in waiting]
        assert [d.status_code for d in done] == [200, 200] and {d.json()["batch_size"] for d in done} == {2}
        health = c.get("/healthz")
        assert (health.status_code, health.json()) == (503, {"status": "draining"})  # a balancer stops sending
    with client(pipe, max_batch=8, max_wait_ms=LONG_WAIT_MS, timeout_s=0.2) as c:
        r = post_file(c, image, question)
        assert r.status_code == 504 and "timeout" in r.json()["error"]
        assert metric(c.get("/metrics").text, "vlsparse_queue_depth") == 0  # the timed-out request left the queue
        assert c.app.state.batcher.batches == 0


def test_settings_refuse_bad_options():
    with pytest.raises(ValueError, match=r"max_batch \(--max-batch\) must be an integer >= 1, got 0"):
        Settings(max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        Settings(max_wait_ms=-1)
    with pytest.raises(TypeError, match="max_bach"):
        Settings.from_options(max_bach=3)
    assert Settings.from_options(port=None, max_queue=9) == Settings(max_queue=9)


# -- the real process --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data: bytes | None = None, timeout: float = 120.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_serve_process_without_torch_drains_on_sigterm(easy, pipe, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               PYTHONWARNINGS="ignore")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "vlsparse.cli", "serve", "--model", str(easy.bundles[KIND]),
                             "--port", str(port), "--max-wait-ms", str(LONG_WAIT_MS), "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def up():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                return http(base + "/healthz", timeout=5)[0] == 200
            except OSError:
                return False

        wait_until(up, "the server to start")
        cases = distinct_cases(easy, 5)
        bodies = [json.dumps({"image": base64.b64encode(open(easy.images[i], "rb").read()).decode(),
                              "question": easy.questions[i], "top_k": 3}).encode() for i in cases]
        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(http, base + "/v1/predict", b) for b in bodies]
            wait_until(lambda: metric(http(base + "/metrics")[1].decode(), "vlsparse_queue_depth") == 5,
                       "five queued requests")
            proc.send_signal(signal.SIGTERM)  # the batch waits for 600 s: the drain must run it now
            results = [f.result() for f in futures]
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "blocked" not in stderr
    for i, (status, body) in zip(cases, results):
        assert status == 200, body
        out = json.loads(body)
        assert out["batch_size"] == 5 and same(pairs(out), pipe(easy.images[i], easy.questions[i], top_k=3))
