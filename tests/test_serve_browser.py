"""The page of `vlsparse serve` (GET /) in a real headless Chromium, driven through Selenium.

Needs the Debian packages chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver) and selenium
(the dev extra); skips with the reason when one is missing. The reference is `vlsparse.Pipeline` on the same
image file and question. The screenshot is saved under the test's tmp_path; with VLSPARSE_DOCS_SCREENSHOT=1 it
is also copied to docs/serve-page.png (the one in README).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
QUESTION = "what color is the shape?"
KIND = "onnx-sparse"

if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)",
                allow_module_level=True)
pytest.importorskip("selenium", reason="selenium (the dev extra) is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("easy_vqa")

import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.fixtures.bundles import shared_easy_bundles  # noqa: E402
from vlsparse import Pipeline  # noqa: E402
from vlsparse.serve import Settings, create_app  # noqa: E402


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    return shared_easy_bundles(tmp_path_factory)


@pytest.fixture(scope="module")
def server(easy):
    """(base URL, pipeline) of a real uvicorn server in a thread of this process, on a free port."""
    pipe = Pipeline.load(easy.bundles[KIND], threads=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(pipe, Settings(port=port, threads=1)), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    ready = threading.Event()
    while not srv.started and thread.is_alive():
        ready.wait(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}", pipe
    srv.should_exit = True
    thread.join(60)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=900,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _color_case(easy, pipe) -> str:
    """An easy-VQA test image whose top answer to QUESTION is a colour, with distinct top-5 scores."""
    for image in dict.fromkeys(easy.images):
        top = pipe(image, QUESTION, top_k=5)
        scores = sorted(s for _, s in top)
        if top[0][0] not in {"yes", "no", "circle", "rectangle", "triangle"} and min(
                b - a for a, b in zip(scores, scores[1:])) > 2e-3:
            return image
    pytest.fail("no test image gets a colour answer")


def test_page_shows_the_pipelines_answers(easy, server, browser, tmp_path):
    base, pipe = server
    image = _color_case(easy, pipe)
    expected = pipe(image, QUESTION, top_k=5)
    browser.get(base + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "format").text)
    assert browser.find_element(By.ID, "format").text == KIND
    assert browser.find_element(By.ID, "sparsity").text == "70%"
    browser.find_element(By.ID, "image").send_keys(str(image))
    browser.find_element(By.ID, "question").send_keys(QUESTION)
    browser.find_element(By.ID, "ask").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#answers .answer") or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    rows = browser.find_elements(By.CSS_SELECTOR, "#answers .answer")
    shown = [(r.find_element(By.CLASS_NAME, "name").text, float(r.find_element(By.CLASS_NAME, "score").text))
             for r in rows]
    assert [a for a, _ in shown] == [a for a, _ in expected]
    assert all(abs(s - e) <= 6e-4 for (_, s), (_, e) in zip(shown, expected))  # shown with 3 decimals
    widths = [r.find_element(By.CSS_SELECTOR, ".bar > div").get_attribute("style") for r in rows]
    assert widths[0] == f"width: {100 * expected[0][1]:.1f}%;"
    assert browser.find_element(By.ID, "latency").text.startswith("latency ")
    shot = tmp_path / "serve-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
    if os.environ.get("VLSPARSE_DOCS_SCREENSHOT") == "1":
        docs = Path(__file__).resolve().parents[1] / "docs"
        docs.mkdir(exist_ok=True)
        shutil.copyfile(shot, docs / "serve-page.png")
