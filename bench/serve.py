"""The web service under load: throughput and p50/p99 latency at 1, 4 and 16 concurrent clients, with
dynamic batching on and off, in one run.

    .venv/bin/python bench/serve.py [--clients 1,4,16] [--requests 96] [--rounds 3] [--threads 1] [--max-batch 16]
                                    [--max-wait-ms 50] [--checkpoint FILE] [--tiny] [--check]

Set-up (not timed): a mobilenet_v2 (real weights) cache of the first `--images` COCO photos and a
decoder trained on it for a few epochs (or `--checkpoint`). Two servers run side by side as the CLI
starts them (`python -m stage2_decoder.serve`, one with `--no-batching`), each with `--threads` torch
threads. For each client count, each server in turn gets the same closed loop: every client posts one
real photo at a time (default settings: beam 3, one caption) and sends the next as soon as the answer
comes, until `--requests` requests are answered (in `--rounds` turns, the two servers alternating).
Throughput = answered requests / wall time; latency
per request from send to answer. Target: with 16 clients, batching >= 2x the throughput without.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness  # noqa: F401  (puts the repository on sys.path)
from harness import Report, default_data

import httpx  # noqa: E402


def make_checkpoint(coco: Path, n_images: int, epochs: int, tmp: Path) -> Path:
    """The set-up's decoder; one already made in `tmp` (a `--work` folder) is used again."""
    from stage1_extract.extract import ExtractConfig, extract
    from stage2_decoder.train import TrainConfig, train

    run, metrics = tmp / "run", tmp / "run" / "metrics.jsonl"
    if (run / "best.pt").is_file() and metrics.is_file() and len(metrics.read_text().splitlines()) >= epochs:
        return run / "best.pt"
    cache = tmp / "coco-mobilenet_v2.h5"
    extract(ExtractConfig(images=str(coco / "images"), captions=str(coco / "captions.json"), out=str(cache),
                          dataset="coco", backbone="mobilenet_v2", weights="default", batch_size=16, workers=1,
                          device="cpu", limit=n_images, progress=False))
    train(TrainConfig(features=str(cache), out=str(run), epochs=epochs, scst_epochs=0, device="cpu", progress=False))
    return run / "best.pt"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, batching: bool, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "stage2_decoder.serve", "--checkpoint", str(ckpt), "--port", str(port),
           "--device", "cpu", "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--no-progress", "--batching" if batching else "--no-batching"]
    proc = subprocess.Popen(cmd, cwd=harness.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"server at {url} did not come up within {timeout:.0f} s")


def load(url: str, photos: list[tuple[str, bytes]], clients: int, requests: int) -> tuple[float, list[float]]:
    """(requests per second, per-request latencies in s) of a closed loop of `clients` posting one photo each."""
    latencies: list[float] = []
    errors: list[str] = []
    lock, counter = threading.Lock(), iter(range(requests))
    start = threading.Barrier(clients + 1)

    def client():
        with httpx.Client(timeout=300) as c:
            start.wait()
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, data = photos[i % len(photos)]
                t0 = time.perf_counter()
                r = c.post(url + "/v1/caption", files=[("images", (name, data, "image/jpeg"))])
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if r.status_code != 200 or not r.json()["results"][0]["caption"]:
                        errors.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return len(latencies) / wall, latencies


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile by linear interpolation (statistics.quantiles' 'inclusive' method)."""
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--checkpoint", type=Path, default=None, help="Serve this instead of training one.")
    ap.add_argument("--work", type=Path, default=None,
                    help="Keep the set-up's cache and decoder here and use them again (default: a temporary folder).")
    ap.add_argument("--images", type=int, default=400, help="COCO photos in the set-up cache (and sent).")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=96, help="Requests answered per client count and mode.")
    ap.add_argument("--rounds", type=int, default=3, help="Turns each mode takes per client count.")
    ap.add_argument("--threads", type=int, default=1, help="Torch threads in each server (1: on a shared box more spin-wait).")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=50.0)
    ap.add_argument("--tiny", action="store_true", help="Smoke run: 16 photos, 2 epochs, 1 and 4 clients, 8 requests.")
    ap.add_argument("--check", action="store_true", help="Exit 1 when the target is missed.")
    args = ap.parse_args()
    if args.tiny:
        args.images, args.epochs, args.requests, args.clients, args.rounds = 16, 2, 8, "1,4", 2
    clients = [int(c) for c in args.clients.split(",")]
    coco = args.data / "coco2017-mini"

    rep = Report("serve")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = args.checkpoint or make_checkpoint(coco, args.images, args.epochs, work)
        from common.datasets import load_coco

        records = load_coco(coco / "captions.json", coco / "images")[:args.images]
        photos = [(Path(r.path).name, Path(r.path).read_bytes()) for r in records]
        servers = {mode: start_server(ckpt, mode == "batching", args) for mode in ("batching", "one at a time")}
        try:
            for proc, url in servers.values():
                wait_ready(proc, url)
            for proc, url in servers.values():  # warm-up: first calls allocate and pick kernels
                load(url, photos, 2, 4)
            rows, rps = [], {}
            for n in clients:
                # the two modes take turns, `--rounds` times, so a change in the machine's load hits both
                wall, lat = {m: 0.0 for m in servers}, {m: [] for m in servers}
                calls = {m: 0 for m in servers}
                for _ in range(args.rounds):
                    for mode, (proc, url) in servers.items():
                        before = httpx.get(url + "/v1/stats").json()["model_calls"]
                        r, got = load(url, photos, n, max(args.requests // args.rounds, n))
                        calls[mode] += httpx.get(url + "/v1/stats").json()["model_calls"] - before
                        wall[mode] += len(got) / r
                        lat[mode] += got
                for mode in servers:
                    rps[mode, n] = len(lat[mode]) / wall[mode]
                    rows.append([n, mode, rps[mode, n], 1000 * percentile(lat[mode], 50),
                                 1000 * percentile(lat[mode], 99), len(lat[mode]), len(lat[mode]) / calls[mode]])
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for proc, _ in servers.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    print(f"  checkpoint: {'given' if args.checkpoint else f'{args.images} COCO photos, {args.epochs} epochs'}; "
          f"servers: {args.threads} torch thread(s), --max-batch {args.max_batch}, --max-wait-ms {args.max_wait_ms:g}; "
          f"beam 3, one caption, one photo per request")
    rep.table(["clients", "mode", "req/s", "p50 ms", "p99 ms", "requests", "images/call"], rows)
    for n in clients:
        target = 2.0 if n == max(clients) and n >= 16 else None
        rep.ratio(f"serve.throughput {n} clients batching/one-at-a-time", rps["batching", n] / rps["one at a time", n],
                  target)
    return rep.done(args.check)


if __name__ == "__main__":
    sys.exit(main())
