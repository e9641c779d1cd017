"""``rlrr serve`` pushed past its capacity, on loopback: every request answered, memory bounded, recovery.

The service runs in its own process on one core (ViT-S/16 at 224 px with seeded random weights, three RLRR
task adapters, ``--max-queue`` bounded), the load generator on the other.
First its capacity is measured closed-loop (``--clients`` requests kept in flight); then an open-loop
load offers ``--factor`` × that rate for ``--seconds`` (a bounded number of requests, each sent at its
time whatever came back, so a slow answer never slows the offer), and every outcome is counted: 200, 503 (with
Retry-After), anything else, or a connection that failed or hung (must be none); the generator is one
asyncio loop sharing the machine's cores with the server, so the offered rate it reaches is printed too.  The server's peak
resident memory is read from /proc before and after, and one more closed-loop round checks it is back to
its old pace.  Prints one JSON line and writes ``last_serve_overload.json`` beside this script.

    python benchmarks/serve_overload.py [--factor 3] [--seconds 20] [--max-queue 64] [--clients 32]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

import rlrr
from rlrr.data.synthetic import shapes_task

MODEL = "vit_small_patch16_224"  # slow enough per image that one core of load can offer 3x its capacity


def adapters(folder: Path) -> tuple[Path, list[str]]:
    """A backbone weights file (random, seeded: no download) and three RLRR adapters of it."""
    torch.manual_seed(0)
    base = rlrr.create_backbone(MODEL, weights=None, num_classes=5)
    weights = folder / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    tasks = folder / "tasks"
    tasks.mkdir()
    names = []
    for t in range(3):
        torch.manual_seed(t)
        model = rlrr.apply(rlrr.create_backbone(MODEL, weights=str(weights), num_classes=5), rlrr.RLRRConfig())
        with torch.no_grad():
            for _, p in rlrr.trainable_parameters(model):
                p.add_(torch.randn_like(p) * 0.05)
        rlrr.save_adapter(model, tasks / f"task{t}.safetensors")
        names.append(f"task{t}")
    return weights, names


def png() -> bytes:
    import io
    from PIL import Image
    images, _, _ = shapes_task("dsprites_loc", 1)
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG")
    return buf.getvalue()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def open_loop(url: str, image: bytes, tasks: list[str], rate: float, total: int) -> list[tuple]:
    """``total`` requests, the i-th sent at i / rate seconds whatever came back (one event loop: the load
    generator costs as little CPU as it can on the machine it shares with the server)."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                                 timeout=60) as client:
        async def one(i: int) -> tuple:
            await asyncio.sleep(i / rate)
            t = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/classify", files={"image": ("x.png", image, "image/png")},
                                      data={"task": tasks[i % len(tasks)]})
                return r.status_code, time.perf_counter() - t, r.headers.get("retry-after")
            except httpx.HTTPError as e:  # a dropped or hung connection: what must never happen
                return type(e).__name__, time.perf_counter() - t, None
        return await asyncio.gather(*(one(i) for i in range(total)))


def closed_loop(url: str, image: bytes, tasks: list[str], clients: int, n: int) -> float:
    """Requests per second with ``clients`` requests in flight at all times (every answer must be 200)."""
    async def run() -> list:
        async with httpx.AsyncClient(timeout=60) as client:
            gate = asyncio.Semaphore(clients)

            async def one(i: int):
                async with gate:
                    r = await client.post(f"{url}/v1/classify", files={"image": ("x.png", image, "image/png")},
                                          data={"task": tasks[i % len(tasks)]})
                    return r.status_code
            return await asyncio.gather(*(one(i) for i in range(n)))
    start = time.perf_counter()
    codes = asyncio.run(run())
    assert set(codes) == {200}, codes
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--factor", type=float, default=3.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--clients", type=int, default=32, help="requests in flight while measuring capacity")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        (weights, tasks), image = adapters(Path(tmp)), png()
        proc = subprocess.Popen([sys.executable, "-m", "rlrr.cli", "serve", "--model", MODEL, "--weights", str(weights),
                                 "--adapters", str(Path(tmp) / "tasks"), "--port", str(port), "--max-queue",
                                 str(args.max_queue)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})  # one core each
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            closed_loop(url, image, tasks, args.clients, 40)  # warm-up
            capacity = closed_loop(url, image, tasks, args.clients, 200)
            rss_before = peak_rss_mb(proc.pid)
            rate = args.factor * capacity
            total = int(rate * args.seconds)
            start = time.perf_counter()
            outcomes = asyncio.run(open_loop(url, image, tasks, rate, total))
            offered_s = time.perf_counter() - start
            codes = [o[0] for o in outcomes]
            ok = sorted(t for c, t, _ in outcomes if c == 200)
            busy = [o for o in outcomes if o and o[0] == 503]
            after = closed_loop(url, image, tasks, args.clients, 200)
            result = {"capacity_rps": round(capacity, 1), "offered_rps": round(total / offered_s, 1),
                      "factor": args.factor, "requests": total, "max_queue": args.max_queue,
                      "answered_200": codes.count(200), "answered_503": len(busy),
                      "other": sum(c not in (200, 503) for c in codes),
                      "served_rps": round(codes.count(200) / offered_s, 1),
                      "p50_ms_200": round(1000 * statistics.median(ok), 1) if ok else None,
                      "p99_ms_200": round(1000 * ok[int(0.99 * (len(ok) - 1))], 1) if ok else None,
                      "p99_ms_503": round(1000 * sorted(t for _, t, _ in busy)[int(0.99 * (len(busy) - 1))], 1)
                      if busy else None,
                      "retry_after_s": sorted({int(r) for _, _, r in busy}) if busy else [],
                      "peak_rss_mb_before": round(rss_before, 1), "peak_rss_mb_after": round(peak_rss_mb(proc.pid), 1),
                      "capacity_after_rps": round(after, 1), "recovered_ratio": round(after / capacity, 3)}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps(result))
    (Path(__file__).with_name("last_serve_overload.json")).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
