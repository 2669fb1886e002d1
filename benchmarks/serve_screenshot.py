"""A screenshot of `vlsparse serve`'s page answering one easy-VQA test question (README "Serve").

    python benchmarks/serve_screenshot.py --model exports/easy-vqa-70 --out docs/serve-page.png

Starts `vlsparse serve` on a free local port, drives the page in headless Chromium (Debian's chromium and
chromium-driver, through Selenium): test image 3, "what color is the shape?", then saves the window.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", required=True, help="bundle directory")
p.add_argument("--out", required=True, help="PNG file to write")
args = p.parse_args()
import easy_vqa, httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
srv = subprocess.Popen([sys.executable, "-m", "vlsparse", "serve", "--model", args.model, "--port", str(port)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
base = f"http://127.0.0.1:{port}"
for _ in range(240):
    try:
        if httpx.get(base + "/healthz").status_code == 200: break
    except Exception: pass
    time.sleep(0.5)
o = webdriver.ChromeOptions(); o.binary_location = "/usr/bin/chromium"
for f in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          f"--user-data-dir={tempfile.mkdtemp()}", "--window-size=900,760"):
    o.add_argument(f)
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
try:
    d.get(base + "/")
    w = WebDriverWait(d, 60); w.until(lambda d: d.find_element(By.ID, "format").text)
    img = os.path.join(os.path.dirname(easy_vqa.__file__), "data/test/images/3.png")
    d.find_element(By.ID, "image").send_keys(img)
    d.find_element(By.ID, "question").send_keys("what color is the shape?")
    d.find_element(By.ID, "ask").click()
    w.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#answers .answer"))
    time.sleep(0.5)
    print([r.text for r in d.find_elements(By.CSS_SELECTOR, "#answers .answer")])
    d.save_screenshot(args.out)
finally:
    d.quit(); srv.terminate(); srv.wait(30)
