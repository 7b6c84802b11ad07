"""The web service under load: throughput, p50/p99 latency and errors at 1, 4, 16 and 64 concurrent
clients, with dynamic batching on and off, then an overload: 256 clients at once with a 5 s timeout.

    .venv/bin/python bench/serve.py [--clients 1,4,16,64] [--requests 192] [--rounds 3] [--threads 1]
                                    [--max-batch 16] [--max-wait-ms 50] [--flood 256] [--flood-timeout 5]
                                    [--checkpoint FILE] [--tiny] [--check]

Set-up (not timed): a mobilenet_v2 (real weights) cache of the first `--images` COCO photos and a
decoder trained on it for a few epochs (or `--checkpoint`). Two servers run side by side as the CLI
starts them (`python -m stage2_decoder.serve`, one with `--no-batching`), each with `--threads` torch
threads. The client is independent of the server's code: asyncio + httpx, one connection per client, or
with `--client ab` ApacheBench (`ab`, from apache2-utils), whose C loop leaves the shared cores to the servers.
For each client count, each server in turn gets the same closed loop: every client posts one real
photo at a time (default settings: beam 3, one caption) and sends the next as soon as the answer
comes, until `--requests` requests are answered (in `--rounds` turns, the two servers alternating).
Throughput = answered requests / wall time; latency per request from send to answer; errors = any
answer but 200. Overload (the batching server only): `--flood` clients each post one photo at the
same moment and give up after `--flood-timeout` s: the share answered in time, the share refused
early (503), the share that timed out, and the wasted work (images the model captioned for clients
that had already given up, from `/v1/stats`), and the slowest `/healthz` answer meanwhile (polled every
0.25 s from a process of its own). Abandoned work (the batching server): `--abandon` (48) clients post at
once and give up after `--give-up` (0.3) s, then one more request is timed against a lone request's
latency (target: within max(3 s, 3x)), with the images captioned for clients that had left. Memory
(the batching server, read from /proc): resident memory after 100 mixed requests and after `--memory`
(2,000), then the peak and the resident memory around one request of 16 PNGs of 6300 x 6300 (each under
--max-pixels, together over --max-request-pixels) and one of 16 of 2500 x 2500 (the most the defaults
accept). Targets: with 16 clients, batching >= 2.5x the throughput without; after 48 clients abandon,
the next request within max(3 s, 3x a lone one); RSS after 2,000 mixed requests within 10% of after 100.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # noqa: F401  (puts the repository on sys.path)
from harness import Report, default_data

import httpx  # noqa: E402


def make_checkpoint(coco: Path, n_images: int, epochs: int, tmp: Path) -> Path:
    """The set-up's decoder; one already made in `tmp` (a `--work` folder) is used again."""
    from stage1_extract.extract import ExtractConfig, extract
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

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
    if args.encode_chunk is not None:
        cmd += ["--encode-chunk", str(args.encode_chunk)]
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


async def _closed_loop(url: str, photos: list[tuple[str, bytes]], clients: int, requests: int):
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))

    async def client(c):
        for i in counter:
            name, data = photos[i % len(photos)]
            t0 = time.perf_counter()
            try:
                r = await c.post(url + "/v1/caption", files=[("images", (name, data, "image/jpeg"))])
                ok = r.status_code == 200 and bool(r.json()["results"][0]["caption"])
                why = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as e:
                ok, why = False, f"{type(e).__name__}"
            latencies.append(time.perf_counter() - t0)
            if not ok:
                errors.append(why)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(clients)])
        wall = time.perf_counter() - t0
    return len(latencies) / wall, latencies, errors


def load(url: str, photos: list[tuple[str, bytes]], clients: int, requests: int) -> tuple[float, list[float], list]:
    """(requests per second, per-request latencies in s, errors) of a closed loop of `clients` posting one photo each."""
    return asyncio.run(_closed_loop(url, photos, clients, requests))


def load_ab(url: str, photo: tuple[str, bytes], clients: int, requests: int,
            tmp: Path) -> tuple[float, list[float], list]:
    """As `load`, with ApacheBench (`ab`, a C client that costs the shared cores little) posting one photo."""
    name, data = photo
    post = httpx.Request("POST", url, files=[("images", (name, data, "image/jpeg"))])  # the httpx client's body
    (tmp / "ab-body").write_bytes(post.read())
    ctype = post.headers["content-type"]
    cmd = ["ab", "-q", "-n", str(requests), "-c", str(clients), "-s", "300", "-p", str(tmp / "ab-body"),
           "-T", ctype, "-g", str(tmp / "ab-times.tsv"), url + "/v1/caption"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"ab failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    wall = float(re.search(r"^Time taken for tests:\s+([\d.]+)", out.stdout, re.M).group(1))
    # ab's "Length" failures are answers whose size differs from the first one's: captions and scores vary
    kinds = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: \d+, Exceptions: (\d+)\)", out.stdout)
    failed = sum(int(n) for n in kinds.groups()) if kinds else 0
    non_2xx = re.search(r"^Non-2xx responses:\s+(\d+)", out.stdout, re.M)
    failed += int(non_2xx[1]) if non_2xx else 0
    rows = (tmp / "ab-times.tsv").read_text().splitlines()[1:]  # starttime seconds ctime dtime ttime wait
    latencies = [float(r.split("\t")[4]) / 1000 for r in rows if r.strip()]
    return len(latencies) / wall, latencies, ["ab: failed or non-2xx"] * failed


def settle(url: str, quiet_s: float = 2.0, limit_s: float = 120.0) -> dict:
    """/v1/stats once the model has made no call for `quiet_s` (the server has worked off its queue)."""
    stats, last, deadline = None, time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        now = httpx.get(url + "/v1/stats", timeout=30).json()
        if stats is None or now["model_calls"] != stats["model_calls"]:
            stats, last = now, time.monotonic()
        elif time.monotonic() - last >= quiet_s:
            break
        time.sleep(0.2)
    return stats


HEALTH_PROBE = """
import sys, time
import httpx
url, timeout = sys.argv[1], float(sys.argv[2])
print("ready", flush=True)
worst, end = 0.0, time.monotonic() + timeout
with httpx.Client(timeout=timeout) as c:
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            dt = time.perf_counter() - t0 if c.get(url + "/healthz").status_code == 200 else float("inf")
        except httpx.HTTPError:
            dt = float("inf")
        worst = max(worst, dt)
        time.sleep(0.25)
print(worst)
"""


def flood(url: str, photos: list[tuple[str, bytes]], clients: int, timeout: float) -> dict:
    """`clients` one-photo requests at once, each given up after `timeout` s: shares and wasted work."""
    before = settle(url)

    async def run():
        async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=clients + 4)) as c:
            async def one(i):
                name, data = photos[i % len(photos)]
                t0 = time.perf_counter()
                try:
                    r = await c.post(url + "/v1/caption", files=[("images", (name, data, "image/jpeg"))])
                    return r.status_code, time.perf_counter() - t0
                except httpx.TimeoutException:
                    return "timeout", time.perf_counter() - t0
                except httpx.HTTPError:
                    return "dropped", time.perf_counter() - t0

            # /healthz is polled from a process of its own: polled from this event loop, its latency would
            # include the time this client spends starting `clients` uploads
            probe = subprocess.Popen([sys.executable, "-c", HEALTH_PROBE, url, str(timeout)], stdout=subprocess.PIPE,
                                     text=True)
            probe.stdout.readline()  # polling from now on
            out = await asyncio.gather(*[one(i) for i in range(clients)])
            return out, float(probe.communicate(timeout=timeout + 60)[0].strip() or "inf")  # the slowest answer

    out, worst_health = asyncio.run(run())
    after = settle(url)
    codes = [c for c, _ in out]
    answered = codes.count(200)
    refused = [dt for c, dt in out if c == 503]
    captioned = after["images"] - before["images"]
    return {"answered": answered / clients, "refused": len(refused) / clients,
            "refused_p99_s": percentile(refused, 99) if refused else float("nan"),
            "timeout": codes.count("timeout") / clients, "dropped": codes.count("dropped") / clients,
            "other": sum(1 for c in codes if c not in (200, 503, "timeout", "dropped")) / clients,
            "wasted": max(0, captioned - answered) / clients, "healthz_worst_s": worst_health}


def abandon(url: str, photos: list[tuple[str, bytes]], clients: int, give_up: float) -> dict:
    """A lone request's latency (median of 5), then `clients` requests at once whose clients give up after
    `give_up` s, then one more request: how long it waits behind work for clients that left."""
    def one_request() -> float:
        name, data = photos[0]
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/caption", files=[("images", (name, data, "image/jpeg"))], timeout=300)
        r.raise_for_status()
        return time.perf_counter() - t0

    lone = statistics.median(one_request() for _ in range(5))
    before = settle(url)

    async def leave():
        async with httpx.AsyncClient(timeout=give_up, limits=httpx.Limits(max_connections=clients + 4)) as c:
            async def one(i):
                name, data = photos[i % len(photos)]
                try:
                    await c.post(url + "/v1/caption", files=[("images", (name, data, "image/jpeg"))])
                    return True
                except httpx.HTTPError:
                    return False
            return sum(await asyncio.gather(*[one(i) for i in range(clients)]))

    answered = asyncio.run(leave())
    next_s = one_request()
    after = settle(url)
    return {"lone_s": lone, "next_s": next_s, "answered": answered,
            "wasted": max(0, after["images"] - before["images"] - answered - 1)}


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process' resident memory (VmRSS) or its peak since the last reset (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def mixed_requests(photos: list[tuple[str, bytes]], n: int) -> list[list[tuple[str, bytes, str]]]:
    """`n` requests of the kinds a real service sees, in turn: one JPEG, four JPEGs, one PNG, and one
    upload that is not an image (a 415 among the others)."""
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.open(io.BytesIO(photos[0][1])).save(png, "PNG")
    kinds = [lambda i: [(photos[i % len(photos)][0], photos[i % len(photos)][1], "image/jpeg")],
             lambda i: [(photos[(i + k) % len(photos)][0], photos[(i + k) % len(photos)][1], "image/jpeg")
                        for k in range(4)],
             lambda i: [("photo.png", png.getvalue(), "image/png")],
             lambda i: [("notes.jpg", b"not an image at all", "image/jpeg")]]
    return [kinds[i % len(kinds)](i) for i in range(n)]


def post_all(url: str, requests: list[list[tuple[str, bytes, str]]], clients: int) -> dict[int, int]:
    """Post every request, `clients` at a time; the count of each status code."""
    async def run():
        codes: dict[int, int] = {}
        todo = iter(requests)

        async def client(c):
            for files in todo:
                r = await c.post(url + "/v1/caption", files=[("images", f) for f in files])
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as c:
            await asyncio.gather(*[client(c) for _ in range(clients)])
        return codes

    return asyncio.run(run())


def memory(url: str, pid: int, photos: list[tuple[str, bytes]], n_requests: int, big_sides: list[int]) -> dict:
    """The batching server's resident memory: after 100 mixed requests and after `n_requests`, then for
    each side in `big_sides` the peak and the resident memory around one request of 16 PNGs of side x side
    pixels (6300: each under the default --max-pixels, ~120 MB decoded, 16 of them over
    --max-request-pixels; 2500: the largest 16-image request the defaults accept)."""
    import io

    import numpy as np
    from PIL import Image

    first = min(100, n_requests)
    reqs = mixed_requests(photos, n_requests)
    codes = post_all(url, reqs[:first], 8)
    settle(url)
    rss_first = rss_mb(pid)
    more = post_all(url, reqs[first:], 8)
    for k, v in more.items():
        codes[k] = codes.get(k, 0) + v
    settle(url)
    rss_all = rss_mb(pid)
    big = []
    for side in big_sides:
        # rows repeated in bands of 64: large in pixels, small as PNG (the hostile case: memory out of
        # proportion to the bytes on the wire)
        ramp = np.linspace(0, 255, side).astype(np.uint8)
        arr = np.empty((side, side, 3), np.uint8)
        arr[..., 0], arr[..., 1], arr[..., 2] = ramp[None, :], 128, ramp[(np.arange(side) // 64 * 64)][:, None]
        png = io.BytesIO()
        Image.fromarray(arr).save(png, "PNG", compress_level=9)
        del arr
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the process' peak (VmHWM) to its current RSS
        before = rss_mb(pid)
        r = httpx.post(url + "/v1/caption", files=[("images", (f"big{i}.png", png.getvalue(), "image/png"))
                                                   for i in range(16)], timeout=600)
        settle(url)
        big.append({"side": side, "status": r.status_code, "bytes": 16 * len(png.getvalue()), "before_mb": before,
                    "peak_mb": rss_mb(pid, "VmHWM"), "after_mb": rss_mb(pid)})
    return {"requests": n_requests, "first": first, "codes": codes, "rss_first_mb": rss_first,
            "rss_all_mb": rss_all, "big": big}


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
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=192,
                    help="Requests answered per client count and mode (at 16 clients, 4 per client per round).")
    ap.add_argument("--rounds", type=int, default=3, help="Turns each mode takes per client count.")
    ap.add_argument("--client", choices=["httpx", "ab"], default="httpx",
                    help="Closed-loop client: asyncio + httpx cycling over the photos, or ApacheBench posting the first.")
    ap.add_argument("--threads", type=int, default=1, help="Torch threads in each server (1: on a shared box more spin-wait).")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=50.0)
    ap.add_argument("--encode-chunk", type=int, default=None, help="The servers' --encode-chunk (default: theirs).")
    ap.add_argument("--flood", type=int, default=256, help="Clients in the overload case (0: skip it).")
    ap.add_argument("--flood-timeout", type=float, default=5.0, help="Seconds each overload client waits.")
    ap.add_argument("--abandon", type=int, default=48,
                    help="Clients that give up after --give-up s before one more request is timed (0: skip it).")
    ap.add_argument("--give-up", type=float, default=0.3, help="Seconds each abandoning client waits.")
    ap.add_argument("--memory", type=int, default=2000,
                    help="Mixed requests in the memory case (0: skip it); resident memory after 100 and after all.")
    ap.add_argument("--big-sides", default="6300,2500", help="Sides of the 16 PNGs of the memory case's last requests.")
    ap.add_argument("--tiny", action="store_true",
                    help="Smoke run: 16 photos, 2 epochs, 1 and 4 clients, 8 requests, a flood of 16, 120 mixed "
                         "requests, 16 PNGs of 1000 x 1000.")
    ap.add_argument("--check", action="store_true", help="Exit 1 when the target is missed.")
    args = ap.parse_args()
    if args.tiny:
        args.images, args.epochs, args.requests, args.clients, args.rounds, args.flood = 16, 2, 8, "1,4", 2, 16
        args.abandon = min(args.abandon, 8)
        args.memory, args.big_sides = min(args.memory, 120), "1000"
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
            rows, rps, errors = [], {}, {}
            for n in clients:
                # the two modes take turns, `--rounds` times, so a change in the machine's load hits both
                wall, lat = {m: 0.0 for m in servers}, {m: [] for m in servers}
                calls = {m: 0 for m in servers}
                for _ in range(args.rounds):
                    for mode, (proc, url) in servers.items():
                        before = httpx.get(url + "/v1/stats").json()["model_calls"]
                        todo = max(args.requests // args.rounds, n)
                        r, got, errs = (load_ab(url, photos[0], n, todo, work) if args.client == "ab"
                                        else load(url, photos, n, todo))
                        errors[mode, n] = errors.get((mode, n), 0) + len(errs)
                        calls[mode] += httpx.get(url + "/v1/stats").json()["model_calls"] - before
                        wall[mode] += len(got) / r
                        lat[mode] += got
                for mode in servers:
                    rps[mode, n] = len(lat[mode]) / wall[mode]
                    rows.append([n, mode, rps[mode, n], 1000 * percentile(lat[mode], 50),
                                 1000 * percentile(lat[mode], 99), len(lat[mode]), errors[mode, n],
                                 len(lat[mode]) / calls[mode]])
            left = abandon(servers["batching"][1], photos, args.abandon, args.give_up) if args.abandon else None
            overload = flood(servers["batching"][1], photos, args.flood, args.flood_timeout) if args.flood else None
            mem = (memory(servers["batching"][1], servers["batching"][0].pid, photos, args.memory,
                          [int(x) for x in args.big_sides.split(",")]) if args.memory else None)
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
          f"servers: {args.threads} torch thread(s), --max-batch {args.max_batch}, --max-wait-ms {args.max_wait_ms:g}"
          f"{'' if args.encode_chunk is None else f', --encode-chunk {args.encode_chunk}'}; "
          f"beam 3, one caption, one photo per request; client {args.client}")
    rep.table(["clients", "mode", "req/s", "p50 ms", "p99 ms", "requests", "errors", "images/call"], rows)
    if overload:
        o = overload
        print(f"  overload, {args.flood} clients at once, {args.flood_timeout:g} s client timeout (batching server): "
              f"answered in time {o['answered']:.0%}, refused early (503) {o['refused']:.0%} "
              f"(p99 {o['refused_p99_s']:.2f} s), timed out {o['timeout']:.0%}, connection dropped {o['dropped']:.0%}, "
              f"other {o['other']:.0%}; wasted work {o['wasted']:.2f} images per client; "
              f"/healthz slowest {o['healthz_worst_s']:.2f} s")
    if left:
        a = left
        print(f"  abandoned (batching server): {args.abandon} clients gave up after {args.give_up:g} s "
              f"({a['answered']} answered in time); the next request answered in {a['next_s']:.2f} s, a lone one in "
              f"{a['lone_s']:.2f} s; captioned for clients that had left: {a['wasted']} images")
        rep.ratio("serve.abandon next request / max(3 s, 3 x a lone one)",
                  a["next_s"] / max(3.0, 3 * a["lone_s"]), 1.0, higher_is_better=False)
    if mem:
        m = mem
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(m["codes"].items()))
        print(f"  memory (batching server, 8 clients; one JPEG, four JPEGs, one PNG, one non-image in turn; {codes}): "
              f"RSS {m['rss_first_mb']:.0f} MB after {m['first']} requests, {m['rss_all_mb']:.0f} MB after "
              f"{m['requests']}")
        for b in m["big"]:
            print(f"  one request of 16 PNGs of {b['side']} x {b['side']} ({b['bytes'] / 2**20:.1f} MiB, answered "
                  f"{b['status']}): RSS {b['before_mb']:.0f} MB before, peak {b['peak_mb']:.0f} MB, "
                  f"{b['after_mb']:.0f} MB after")
        rep.ratio(f"serve.memory RSS after {m['requests']} / after {m['first']} mixed requests",
                  m["rss_all_mb"] / m["rss_first_mb"], 1.10, higher_is_better=False)
        b = m["big"][-1]
        rep.ratio(f"serve.memory RSS after / before 16 PNGs of {b['side']} x {b['side']}", b["after_mb"] / b["before_mb"])
    for n in clients:
        target = 2.5 if n == 16 else None
        rep.ratio(f"serve.throughput {n} clients batching/one-at-a-time", rps["batching", n] / rps["one at a time", n],
                  target)
    return rep.done(args.check)


if __name__ == "__main__":
    sys.exit(main())
