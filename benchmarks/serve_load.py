"""Load test of `vlsparse serve` on this machine (127.0.0.1 only): throughput and latency at several concurrencies.

    python benchmarks/serve_load.py --model exports/easy-vqa-70                  # starts the server itself
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 500   # a server already running here

For each concurrency (default 1, 8, 32), ``--requests`` requests (default 2,000) are sent by that many
concurrent clients (httpx, asyncio), each a JSON body with an easy-VQA test image (base64) and its question,
cycling through ``--questions`` of them. Printed per concurrency: throughput (requests/s), client-side
latency p50 / p95 / p99 (ms), the server-side mean latency (ms, from /metrics), the mean batch size the server ran (from /metrics: the batch-size histogram's
sum / count over the run) and the errors (non-200 answers and failed connections); then the machine's load
average, which matters on a shared machine. Output is a Markdown table (README "Serve").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import httpx
import numpy as np

LOCAL = {"127.0.0.1", "localhost"}


def _metric(text: str, name: str) -> float:
    """One unlabelled sample of a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _bodies(n: int) -> list[dict]:
    """n JSON bodies {image (base64 PNG), question, top_k} from the easy-VQA test set (deterministic)."""
    import easy_vqa

    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    pick = np.random.default_rng(0).choice(len(questions), size=min(n, len(questions)), replace=False)
    out = []
    for i in pick:
        with open(paths[image_ids[i]], "rb") as f:
            out.append({"image": base64.b64encode(f.read()).decode(), "question": questions[i], "top_k": 3})
    return out


async def _level(url: str, bodies: list[dict], total: int, concurrency: int) -> dict:
    """Send ``total`` requests with ``concurrency`` clients; latencies (s), errors, wall time, batch sizes."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120.0) as client:
        before = (await client.get("/metrics")).text
        latencies, errors, counter = [], 0, iter(range(total))

        async def worker():
            nonlocal errors
            for i in counter:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", json=bodies[i % len(bodies)])
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        after = (await client.get("/metrics")).text
    batches = _metric(after, "vlsparse_batch_size_count") - _metric(before, "vlsparse_batch_size_count")
    size_sum = _metric(after, "vlsparse_batch_size_sum") - _metric(before, "vlsparse_batch_size_sum")
    served = {k: _metric(after, f"vlsparse_request_latency_seconds_{k}") - _metric(before, f"vlsparse_request_latency_seconds_{k}")
              for k in ("sum", "count")}
    return {"latencies": latencies, "errors": errors, "wall": wall, "mean_batch": size_sum / batches if batches else 0.0,
            "server_ms": 1e3 * served["sum"] / served["count"] if served["count"] else float("nan")}


def _start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vlsparse.cli", "serve", "--model", args.model, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--workers", str(args.workers), "--max-queue", str(max(256, 2 * max(args.concurrency)))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL if args.quiet_server else None)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 300
    while time.monotonic() < end and proc.poll() is None:
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server did not start: {' '.join(cmd)}")


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="bundle directory: start `vlsparse serve` on a free local port")
    where.add_argument("--url", help="a server already running on this machine (127.0.0.1 / localhost only)")
    p.add_argument("--requests", type=int, default=2000, help="requests per concurrency level (default 2000)")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32],
                   help="comma-separated concurrencies (default 1,8,32)")
    p.add_argument("--questions", type=int, default=200, help="distinct test questions to cycle through")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests first")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet-server", action="store_true", help="hide the server's log")
    args = p.parse_args(argv)
    if args.url and urlparse(args.url).hostname not in LOCAL:
        p.error("--url must point at this machine (127.0.0.1 or localhost)")
    bodies = _bodies(args.questions)
    proc, url = _start_server(args) if args.model else (None, args.url.rstrip("/"))
    try:
        asyncio.run(_level(url, bodies, args.warmup, 1))
        load0 = os.getloadavg()
        print(f"# {args.model or url}; {args.requests} requests per level; server --max-batch {args.max_batch} "
              f"--max-wait-ms {args.max_wait_ms:g} --workers {args.workers} --threads {args.threads or 'default'}")
        print("\n| concurrency | requests/s | p50 ms | p95 ms | p99 ms | server mean ms | mean batch | errors |\n"
              "|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in args.concurrency:
            r = asyncio.run(_level(url, bodies, args.requests, c))
            lat = np.array(r["latencies"]) * 1e3 if r["latencies"] else np.array([np.nan])
            p50, p95, p99 = np.percentile(lat, [50, 95, 99])
            print(f"| {c} | {len(r['latencies']) / r['wall']:.1f} | {p50:.1f} | {p95:.1f} | {p99:.1f} | "
                  f"{r['server_ms']:.1f} | {r['mean_batch']:.2f} | {r['errors']} |", flush=True)
        load1 = os.getloadavg()
        print(f"\nmachine: {_cpu()}; load average (1 min) {load0[0]:.2f} before, {load1[0]:.2f} after")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
