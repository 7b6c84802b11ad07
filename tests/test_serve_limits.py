"""The web service under traffic a real deployment sees, over a small stand-in captioner: a bounded queue
(503 + Retry-After), clients that leave (dropped before the model), deadlines, a failing batch retried
per request, settings refused at start-up, undecodable images (415), and the typed API's schema."""
from __future__ import annotations

import asyncio
import contextlib
import io
import struct
import threading
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from common.preprocess import Preprocess
from stage2_decoder.serving.app import create_app
from stage2_decoder.serving.batcher import BatcherConfig, DynamicBatcher, QueueFull
from stage2_decoder.serving.settings import ServeConfig

COLOURS = ("red", "green", "blue")


class StandIn:
    """The captioner's serving interface: a photo's caption names its strongest colour channel.

    `gate` (an Event) holds every model call until set; a photo whose strongest channel is `fail_on`
    makes the whole call raise (as one bad input or an out-of-memory would)."""
    checkpoint_path = "/somewhere/runs/tiny/best.pt"

    def __init__(self, gate: threading.Event | None = None, fail_on: str | None = None):
        self.calls, self.settings, self.gate, self.fail_on = [], [], gate, fail_on
        self.backbone = SimpleNamespace(preprocess=Preprocess(resize=16, crop=16),
                                        encode=lambda x: x.float().mean(dim=(2, 3)))  # (B, 3): mean colour

    def caption_features(self, feats, num_captions=1, beam_size=3, **decode):
        if self.gate is not None:
            self.gate.wait(30)
        names = [COLOURS[int(np.argmax(f))] for f in feats.tolist()]
        self.calls.append(names)
        self.settings.append((beam_size, decode))
        if self.fail_on in names:
            raise RuntimeError("CUDA out of memory (stand-in)")
        out = []
        for name in names:
            caps = [{"caption": f"a {name} photo, take {k}", "score": -0.1 * (k + 1)} for k in range(num_captions)]
            out.append({"caption": caps[0]["caption"], "captions": caps})
        return out


def photo(colour=(200, 30, 40), fmt="JPEG", size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


RED, GREEN, BLUE = photo((220, 10, 10)), photo((10, 220, 10)), photo((10, 10, 220))


def cut_jpeg() -> bytes:
    """A 64x64 JPEG of noise cut short: its header is whole, its pixels are not."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[:1500]


def files(*blobs):
    return [("images", (f"p{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]


@pytest.fixture
def client_for():
    """client_for(captioner, **settings): a TestClient over the app (its lifespan runs)."""
    with warnings.catch_warnings():  # starlette's note that its TestClient will move to httpx2
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    with contextlib.ExitStack() as stack:
        def make(captioner, **settings):
            c = stack.enter_context(TestClient(create_app(captioner, ServeConfig(**settings))))
            return c
        yield make


@contextlib.contextmanager
def live_server(captioner, **settings):
    """The app under a real uvicorn on a loopback port, in a thread; yields its base URL."""
    import socket

    import uvicorn

    from stage2_decoder.serving.protocol import header_timeout_protocol

    cfg = ServeConfig(**settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(captioner, cfg), host="127.0.0.1", port=port,
                                           log_level="warning", http=header_timeout_protocol(cfg.header_timeout_s),
                                           limit_concurrency=cfg.max_connections))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        if captioner.gate is not None:
            captioner.gate.set()
        server.should_exit = True
        thread.join(30)


def _stats(url):
    import httpx

    return httpx.get(url + "/v1/stats", timeout=10).json()


# --- clients that leave, deadlines, a full queue --------------------------------------------------------------


def test_clients_that_leave_are_dropped_before_the_model_sees_them():
    import httpx

    gate = threading.Event()
    cap = StandIn(gate=gate)
    with live_server(cap, max_wait_ms=0, max_queue=64) as (url, _):
        holder = threading.Thread(target=lambda: httpx.post(url + "/v1/caption", files=files(RED), timeout=30))
        holder.start()  # its batch holds the model (the gate) while the others queue
        while _stats(url)["queued_images"] < 1:
            time.sleep(0.02)

        def impatient(_):
            with contextlib.suppress(httpx.TimeoutException):
                httpx.post(url + "/v1/caption", files=files(BLUE), timeout=0.5)
                raise AssertionError("answered while the model was held")

        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(impatient, range(8)))
        deadline = time.monotonic() + 20  # the server notices each closed connection and drops its request
        while _stats(url)["queued_images"] > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _stats(url)["queued_images"] == 1
        gate.set()
        holder.join(30)
        after = httpx.post(url + "/v1/caption", files=files(GREEN), timeout=30)
        assert after.status_code == 200 and after.json()["results"][0]["caption"].startswith("a green photo")
        stats = _stats(url)
    assert cap.calls == [["red"], ["green"]]  # no blue photo reached the model
    assert stats["dropped"] == 8 and stats["queued_images"] == 0


def test_a_flood_gets_early_503s_with_retry_after_and_healthz_still_answers():
    import httpx

    gate = threading.Event()
    cap = StandIn(gate=gate)
    n = 48
    with live_server(cap, max_wait_ms=0, max_queue=8, max_batch=4) as (url, _):
        async def flood():
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n + 4)) as c:
                posts = [asyncio.ensure_future(c.post(url + "/v1/caption", files=files(RED))) for _ in range(n)]
                await asyncio.sleep(0.5)
                health = await c.get(url + "/healthz")  # while the model is held and the queue full
                refused_before_release = sum(t.done() for t in posts)
                gate.set()
                return health, refused_before_release, await asyncio.gather(*posts)

        health, early, replies = asyncio.run(flood())
    codes = [r.status_code for r in replies]
    assert health.status_code == 200
    assert set(codes) == {200, 503}, codes
    busy = [r for r in replies if r.status_code == 503]
    assert early >= len(busy) > 0  # refused at once, not after the model freed up
    assert all(int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["error"] for r in busy)
    assert all(r.json()["results"][0]["caption"].startswith("a red photo") for r in replies if r.status_code == 200)
    assert codes.count(200) <= 8 + 1  # the queue's bound, plus the request the model held


def test_a_request_past_its_deadline_is_answered_503_and_dropped(client_for):
    gate = threading.Event()
    cap = StandIn(gate=gate)
    with live_server(cap, max_wait_ms=0, request_timeout_s=0.5) as (url, _):
        import httpx

        holder = threading.Thread(target=lambda: httpx.post(url + "/v1/caption", files=files(RED), timeout=30))
        holder.start()
        while _stats(url)["queued_images"] < 1:
            time.sleep(0.02)
        late = httpx.post(url + "/v1/caption", files=files(BLUE), timeout=30)
        gate.set()
        holder.join(30)
        stats = _stats(url)
    assert late.status_code == 503 and "deadline" in late.json()["error"] and late.headers["retry-after"]
    assert ["blue"] not in cap.calls and stats["dropped"] >= 1


# --- one failure fails only its own request -------------------------------------------------------------------


def test_a_failing_batch_is_retried_per_request_so_only_the_faulty_one_fails():
    def run(items, key):
        if "bad" in items:
            raise RuntimeError("out of memory")
        return [it.upper() for it in items]

    release = threading.Event()
    b = DynamicBatcher(lambda items, key: (release.wait(10), run(items, key))[1],
                       BatcherConfig(max_batch_images=8, max_wait_ms=500)).start()
    try:
        first = b.submit(["x"])  # holds the worker while the three below queue into one batch
        time.sleep(0.1)
        futures = [b.submit([it]) for it in ("a", "bad", "c")]
        release.set()
        assert first.result(10) == ["X"]
        assert futures[0].result(10) == ["A"] and futures[2].result(10) == ["C"]
        with pytest.raises(RuntimeError, match="out of memory"):
            futures[1].result(10)
    finally:
        b.stop()
    assert b.stats.retried == 1


def test_the_service_fails_only_the_request_whose_photo_breaks_the_batch():
    import httpx

    gate = threading.Event()
    cap = StandIn(gate=gate, fail_on="green")
    with live_server(cap, max_wait_ms=300, max_batch=8) as (url, _):
        from concurrent.futures import ThreadPoolExecutor

        holder = threading.Thread(target=lambda: httpx.post(url + "/v1/caption", files=files(RED), timeout=30))
        holder.start()
        while _stats(url)["queued_images"] < 1:
            time.sleep(0.02)
        with ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(httpx.post, url + "/v1/caption", files=files(p), timeout=30)
                       for p in (BLUE, GREEN, RED)]
            while _stats(url)["queued_images"] < 4:
                time.sleep(0.02)
            gate.set()
            replies = [f.result() for f in pending]
        holder.join(30)
    assert [r.status_code for r in replies] == [200, 500, 200], [r.text for r in replies]
    assert "Traceback" not in replies[1].text and replies[1].json()["error"]
    assert sorted(map(sorted, cap.calls[1:])) == sorted([["blue", "green", "red"], ["blue"], ["green"], ["red"]])


class OutOfMemoryOnGPU(StandIn):
    """A stand-in whose encoder says it is on CUDA (so the batch runs in one call, as on a GPU) and whose model
    runs out of memory on more than one photo, holding a tensor when it does (what a real failed call holds)."""

    def __init__(self):
        super().__init__()
        self.backbone.device = SimpleNamespace(type="cuda")
        self.held = []

    def caption_features(self, feats, num_captions=1, beam_size=3, **decode):
        import weakref

        import torch

        if len(feats) > 1:
            activations = torch.zeros(1 << 16)
            self.held.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)")
        return super().caption_features(feats, num_captions, beam_size, **decode)


def test_a_batch_the_gpu_has_no_memory_for_is_a_503_and_what_it_held_is_freed(client_for):
    """The out-of-memory error went back to the client as a 500 "Internal error", and the cache was emptied
    inside the except block, while the error's frames still held what the failed call had allocated."""
    import gc

    cap = OutOfMemoryOnGPU()
    client = client_for(cap)
    gc.disable()  # what is freed must be freed by the service, not by a collection that happens to run
    try:
        r = client.post("/v1/caption", files=files(RED, GREEN))
        freed = [ref() is None for ref in cap.held]
    finally:
        gc.enable()
    assert r.status_code == 503 and r.headers["Retry-After"] == "5", r.text
    assert "Not enough GPU memory to caption 2 photos at once" in r.json()["error"]
    assert freed == [True]
    ok = client.post("/v1/caption", files=files(BLUE))  # and the service goes on
    assert ok.status_code == 200 and ok.json()["results"][0]["caption"].startswith("a blue photo")


class LostCudaContext(StandIn):
    """A stand-in on "CUDA" whose model hits a device-side assert on a green photo."""

    def __init__(self):
        super().__init__()
        self.backbone.device = SimpleNamespace(type="cuda")

    def caption_features(self, feats, num_captions=1, beam_size=3, **decode):
        import torch

        if any(COLOURS[int(np.argmax(f))] == "green" for f in feats.tolist()):
            # torch.AcceleratorError from torch 2.8, a RuntimeError
            raise getattr(torch, "AcceleratorError", RuntimeError)("CUDA error: device-side assert triggered")
        return super().caption_features(feats, num_captions, beam_size, **decode)


def test_on_a_gpu_the_model_is_warmed_up_before_the_first_request(client_for):
    """The first call on a GPU pays cuBLAS and cuDNN's set-up: at start-up, not on a user's request."""
    gpu, cpu = LostCudaContext(), StandIn()
    client_for(gpu)
    client_for(cpu)
    assert gpu.calls == [["red"]] and cpu.calls == []  # a black photo's strongest channel: the first


def test_a_gpu_that_fails_for_good_turns_healthz_to_503_so_the_server_is_restarted(client_for, monkeypatch):
    """A CUDA error such as a device-side assert ends the process's CUDA context: every later request fails, and
    /healthz kept answering 200, so a load balancer went on sending traffic to a server that could not answer."""
    import stage2_decoder.serving.app as app_mod

    monkeypatch.setattr(app_mod, "device_lost", lambda device: True)  # what one tiny CUDA op would find
    cap = LostCudaContext()
    client = client_for(cap)
    assert client.get("/healthz").status_code == 200
    r = client.post("/v1/caption", files=files(GREEN))
    assert r.status_code == 503 and r.json()["error"] == "The server's GPU failed; it must be restarted."
    health = client.get("/healthz")
    assert health.status_code == 503
    assert health.json()["status"] == "GPU failed: CUDA error: device-side assert triggered"
    calls = len(cap.calls)
    again = client.post("/v1/caption", files=files(RED))  # not sent to the lost GPU
    assert again.status_code == 503 and len(cap.calls) == calls


def test_a_cuda_error_that_leaves_the_gpu_working_is_one_failed_request(client_for, monkeypatch):
    """Not every CUDA error ends the context (a bad launch configuration does not): the server goes on."""
    import stage2_decoder.serving.app as app_mod

    monkeypatch.setattr(app_mod, "device_lost", lambda device: False)
    client = client_for(LostCudaContext())
    r = client.post("/v1/caption", files=files(GREEN))
    assert r.status_code == 500 and r.json()["error"].startswith("Internal error (")
    assert client.get("/healthz").status_code == 200
    assert client.post("/v1/caption", files=files(RED)).status_code == 200


def test_a_gpu_is_found_lost_only_when_a_tiny_operation_fails_on_it():
    import torch

    from stage2_decoder.serving.app import device_lost

    assert device_lost(torch.device("cpu")) is False
    if not torch.cuda.is_available():  # a CUDA device here: asking it fails as on a lost context
        assert device_lost(torch.device("cuda:0")) is True


def test_the_batcher_queue_is_bounded_by_images():
    gate = threading.Event()
    b = DynamicBatcher(lambda items, key: (gate.wait(10), items)[1], BatcherConfig(max_queue_images=3)).start()
    try:
        held = b.submit([1, 2])
        b.submit([3])
        with pytest.raises(QueueFull):
            b.submit([4])
        assert b.stats.refused == 1 and b.pending_images == 3
        gate.set()
        assert held.result(10) == [1, 2]
    finally:
        gate.set()
        b.stop()
    assert b.pending_images == 0


# --- settings and undecodable images --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [{"max_wait_ms": float("inf")}, {"max_wait_ms": float("nan")}, {"max_wait_ms": -1},
                                 {"max_upload_mb": float("inf")}, {"max_upload_mb": float("nan")},
                                 {"request_timeout_s": float("inf")}, {"max_queue": 0}, {"decode_workers": 0},
                                 {"header_timeout_s": 0}, {"keep_alive_s": float("nan")}, {"max_connections": 0}])
def test_settings_that_would_break_the_server_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).replace("_", "-")):
        ServeConfig(**bad)
    with pytest.raises(ValueError):
        BatcherConfig(max_wait_ms=float("inf"))


def test_the_cli_refuses_them_with_one_error_line_and_exit_2_also_under_dry_run(tmp_path):
    from click.testing import CliRunner

    from stage2_decoder.serve import main

    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"not read: the settings are checked first")
    for option, value in [("--max-wait-ms", "inf"), ("--max-upload-mb", "inf"), ("--max-upload-mb", "nan"),
                          ("--request-timeout-s", "0")]:
        r = CliRunner().invoke(main, ["--checkpoint", str(ckpt), "--dry-run", option, value])
        assert r.exit_code == 2, r.output
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(f"error: {option} must be"), r.stderr


@pytest.mark.parametrize("where", ["a port in use", "a host that does not resolve"])
def test_an_address_the_server_cannot_listen_on_is_one_error_line_before_the_checkpoint_loads(tmp_path, where):
    """uvicorn logged `ERROR:    [Errno 98] ...` and exited 3, after the model had loaded."""
    import socket

    from click.testing import CliRunner

    from stage2_decoder.serve import main

    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"not read: the address is tried first")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = ("127.0.0.1", taken.getsockname()[1]) if where == "a port in use" else ("no-such-host.invalid", 8000)
        r = CliRunner().invoke(main, ["--checkpoint", str(ckpt), "--host", host, "--port", str(port)])
    assert r.exit_code == 1, r.output
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(
        f"error: cannot listen on {host}:{port}: "), r.stderr


def _dds_unknown_format() -> bytes:
    """A DDS header Pillow identifies, with a pixel format it cannot decode."""
    head = bytearray(b"DDS " + b"\0" * 124)
    struct.pack_into("<IIII", head, 4, 124, 0x1007, 8, 8)  # size, flags, height, width
    struct.pack_into("<II", head, 4 + 72, 32, 0x4)  # pixel format: size, DDPF_FOURCC
    head[4 + 80:4 + 84] = b"ZZZZ"
    return bytes(head) + b"\0" * 256


def test_an_image_pillow_knows_but_cannot_decode_is_415_not_500(client_for):
    c = client_for(StandIn(), max_wait_ms=1)
    r = c.post("/v1/caption", files=[("images", ("odd.dds", _dds_unknown_format(), "image/vnd-ms.dds"))])
    assert r.status_code == 415 and r.json()["error"].startswith("odd.dds"), r.text
    assert "Error" not in r.json()["error"]  # one plain sentence, no exception chain
    assert c.post("/v1/caption", files=files(RED)).status_code == 200


def test_a_huge_png_is_reduced_before_preprocessing_and_captioned_like_its_file(client_for):
    from common.preprocess import load_views
    from stage2_decoder.serving.uploads import decode_upload

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    big = np.kron(small, np.ones((60, 60, 1), dtype=np.uint8))  # 2400 x 3600 in flat 60 px blocks
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    pp = Preprocess(resize=256, crop=224)
    got = decode_upload("big.png", buf.getvalue(), pp, 1 << 30, 10**9).astype(np.float32)
    want = load_views(buf.getvalue(), pp)[0].astype(np.float32)
    assert got.shape == want.shape == (3, 224, 224)
    # box-reducing by 4 first only averages within flat blocks, except at their edges
    assert np.abs(got - want).mean() < 2.0 and np.median(np.abs(got - want)) <= 1.0


def test_a_large_png_with_damaged_exif_is_422_not_500(client_for):
    """Large non-JPEGs take the reduce path, which reads their EXIF first: a damaged block raised struct.error,
    which that path did not catch (a small image's path did)."""
    buf = io.BytesIO()
    Image.new("RGB", (1024, 1024), (200, 30, 40)).save(buf, "PNG", exif=b"II*\x00")
    c = client_for(StandIn(), max_wait_ms=1)
    r = c.post("/v1/caption", files=[("images", ("big.png", buf.getvalue(), "image/png"))])
    assert r.status_code == 422 and r.json()["error"].startswith("big.png: not a readable image"), r.text
    assert c.post("/v1/caption", files=files(RED)).status_code == 200


def test_text_in_the_images_field_is_named_and_no_photos_is_said_only_when_none_came(client_for):
    """A text value named `images` beside a real photo was answered "No photos: send one or more files"."""
    c = client_for(StandIn(), max_wait_ms=1)
    r = c.post("/v1/caption", files=[("images", ("a.jpg", RED, "image/jpeg"))], data={"images": "hello"})
    assert r.status_code == 400 and r.json()["error"] == "The multipart field 'images' holds text: send only files in it."
    r = c.post("/v1/caption", files=[("other", ("a.jpg", RED, "image/jpeg"))])
    assert r.status_code == 400 and r.json()["error"].startswith("No photos: send one or more files")


def test_the_multipart_media_type_is_read_in_any_case(client_for):
    """Media types are case-insensitive (RFC 9110): `Multipart/Form-Data` was refused with 415."""
    import httpx

    req = httpx.Request("POST", "http://x/v1/caption", files=files(RED))
    body, kind = req.read(), req.headers["content-type"]
    c = client_for(StandIn(), max_wait_ms=1)
    r = c.post("/v1/caption", content=body, headers={"Content-Type": kind.replace("multipart/form-data",
                                                                                  "Multipart/Form-Data")})
    assert r.status_code == 200 and "red" in r.json()["results"][0]["caption"], r.text


def _icon(frame: bytes) -> bytes:
    """An ICO whose directory names one 16x16 frame: `frame`'s bytes."""
    return (struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(frame), 22) + frame)


def test_an_icon_whose_frame_is_over_the_pixel_limit_is_413_before_it_is_decoded(client_for):
    """Pillow decodes an ICO's largest frame while opening it, whatever the directory says: a 640 KB file
    held a 13000x13000 PNG (676 MB decoded) before the size was checked."""
    big_png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 13000, 13000, 8, 6, 0,
                                                                                        0, 0)
    big_bmp = struct.pack("<IiiHH", 40, 13000, 2 * 13000, 1, 32) + bytes(24)
    c = client_for(StandIn(), max_wait_ms=1, max_pixels=10**7)
    for frame in (big_png, big_bmp):
        r = c.post("/v1/caption", files=[("images", ("bomb.ico", _icon(frame), "image/x-icon"))])
        assert r.status_code == 413 and "icon of 13000x13000 pixels" in r.json()["error"], r.text
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 220, 10)).save(buf, "ICO", sizes=[(32, 32)])  # a real icon is captioned
    r = c.post("/v1/caption", files=[("images", ("ok.ico", buf.getvalue(), "image/x-icon"))])
    assert r.status_code == 200 and "green" in r.json()["results"][0]["caption"], r.text


# --- the typed API ------------------------------------------------------------------------------------------


def test_the_openapi_schema_is_valid_and_real_answers_follow_it(client_for):
    import jsonschema
    from openapi_spec_validator import validate

    c = client_for(StandIn(), max_wait_ms=1, max_files=3)
    spec = c.get("/openapi.json").json()
    validate(spec)
    op = spec["paths"]["/v1/caption"]["post"]
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = spec["components"]["schemas"][form["$ref"].rsplit("/", 1)[1]] if "$ref" in form else form
    assert form["properties"]["images"]["type"] == "array" and "images" in form["required"]
    assert {"num_captions", "beam_size"} <= set(form["properties"])
    assert {"200", "400", "413", "415", "422", "503", "504"} <= set(op["responses"])
    assert c.get("/docs").status_code == 200

    def check(reply, status):
        schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
        jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(reply.json())

    ok = c.post("/v1/caption", files=files(RED, BLUE), data={"num_captions": "2"})
    assert ok.status_code == 200
    check(ok, 200)
    assert [r["caption"] for r in ok.json()["results"]] == ["a red photo, take 0", "a blue photo, take 0"]
    for kwargs, status in [({"files": files(RED), "data": {"beam_size": "0"}}, 400),
                           ({"files": files(RED, RED, RED, RED)}, 413),
                           ({"files": [("images", ("n.txt", b"text", "text/plain"))]}, 415),
                           ({"files": [("images", ("cut.jpg", cut_jpeg(), "image/jpeg"))]}, 422)]:
        r = c.post("/v1/caption", **kwargs)
        assert r.status_code == status, r.text
        check(r, status)


def test_head_of_the_page_and_errors_in_megabytes(client_for):
    c = client_for(StandIn(), max_wait_ms=1, max_upload_mb=1)
    assert c.head("/").status_code == 200
    big = photo(fmt="PNG") + b"\0" * (1 << 20)
    err = c.post("/v1/caption", files=[("images", ("big.png", big, "image/png"))]).json()["error"]
    assert err == "big.png is 1.0 MB, over the limit of 1.0 MB per file." or "MB" in err and "bytes" not in err, err


# --- connections: a client gone mid-upload, a head that never ends ------------------------------------------


# a request head and the first 300 bytes of a 100,000-byte body, the rest never sent
PARTIAL_UPLOAD = (b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
                  b"Content-Length: 100000\r\n\r\n--zz\r\nContent-Disposition: form-data; name=\"images\"; "
                  b"filename=\"a.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n" + RED[:300])


def test_a_client_that_leaves_mid_upload_is_one_log_line_not_a_traceback(caplog):
    import logging
    import socket

    import httpx

    caplog.set_level(logging.INFO)
    cap = StandIn()
    with live_server(cap, max_wait_ms=0) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(PARTIAL_UPLOAD)
            time.sleep(0.3)
        deadline = time.monotonic() + 10
        while not any("went away during its upload" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)
        assert httpx.post(url + "/v1/caption", files=files(RED), timeout=30).status_code == 200
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(gone) == 1 and not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert cap.calls == [["red"]]


def test_a_connection_that_never_finishes_its_head_is_closed():
    import socket

    with live_server(StandIn(), header_timeout_s=0.3) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow, socket.create_connection(("127.0.0.1", port)) as mute:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            for s in (slow, mute):
                s.settimeout(20)
                assert s.recv(1024) == b""  # closed by the server, nothing sent
        import httpx

        assert httpx.get(url + "/healthz", timeout=10).status_code == 200


def test_an_upload_stalled_past_the_deadline_is_408_and_frees_its_place():
    """A client that sends a head and the start of its body, then nothing, held its place in --max-queue for as
    long as it kept the connection (every later request: 503), and kept SIGTERM's drain waiting."""
    import socket

    import httpx

    with live_server(StandIn(), max_wait_ms=0, max_queue=1, request_timeout_s=1.0) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            stalled.sendall(PARTIAL_UPLOAD)
            time.sleep(0.3)
            refused = httpx.post(url + "/v1/caption", files=files(RED), timeout=30)
            stalled.settimeout(20)
            reply = b""
            while not reply.endswith(b"}") and (chunk := stalled.recv(4096)):
                reply += chunk
        assert refused.status_code == 503 and "1 requests are in progress" in refused.json()["error"]
        assert reply.split(b"\r\n")[0].endswith(b" 408 Request Timeout"), reply[:200]
        assert b"not finished within 1 s" in reply
        assert b" bytes received)" in reply  # its few hundred bytes, not "0 KB"
        assert httpx.post(url + "/v1/caption", files=files(RED), timeout=30).status_code == 200


def test_a_500_leaves_the_connection_open_for_the_clients_next_request():
    """Starlette's own 500 handler raises the error again once it has answered, and uvicorn then closes the
    connection: a client's next request on it (pipelined here) was lost."""
    import socket

    import httpx

    def raw(blob: bytes) -> bytes:
        req = httpx.Request("POST", "http://x/v1/caption", files=files(blob))
        head = "".join(f"{k}: {v}\r\n" for k, v in req.headers.items() if k.lower() != "host")
        return f"POST /v1/caption HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + req.read()

    with live_server(StandIn(fail_on="green"), max_wait_ms=0) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(raw(GREEN) + raw(RED))
            s.settimeout(20)
            got = b""
            while got.count(b"HTTP/1.1 ") < 2 or not got.endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
    assert got.startswith(b"HTTP/1.1 500 ") and b"Internal error (RuntimeError)" in got
    assert b"HTTP/1.1 200 " in got and b"a red photo" in got, got[-300:]


def test_retry_after_counts_the_requests_still_uploading_and_stops_at_the_request_timeout():
    """Under a flood the queue for the model was empty while 64 admitted requests were still uploading:
    every refusal said "try again in 1 s" though they took ~10 s; and a server with a 1.5 s request
    timeout said 44 s, though by then every request in front is answered or dropped."""
    from types import SimpleNamespace

    from stage2_decoder.serving.admission import busy

    def state(pending, in_progress):
        return SimpleNamespace(batcher=SimpleNamespace(pending_images=pending), in_progress=in_progress,
                               per_image={"encode": 0.1, "decode": 0.05})

    def retry_after(*args):
        return int(busy(*args).headers["Retry-After"])

    assert retry_after(state(0, 0), "busy") == 1
    assert retry_after(state(0, 64), "busy", 30) == 10  # 65 images at 0.15 s each
    assert retry_after(state(200, 64), "busy", 60) == 31  # the queued images, when they are more
    assert retry_after(state(300, 64), "busy", 1.5) == 2
    assert retry_after(state(1000, 64), "busy") == 60


def test_a_misspelt_or_repeated_setting_is_a_400_not_ignored(client_for):
    """`beam=5` was ignored (the server's beam width answered) and `beam_size` sent twice used its last value."""
    c = client_for(StandIn(), max_wait_ms=1)
    r = c.post("/v1/caption", files=files(RED), data={"beam": "5"})
    assert r.status_code == 400 and r.json()["error"].startswith("Unknown form field 'beam'"), r.text
    r = c.post("/v1/caption", files=files(RED), data={"beam_size": ["2", "5"]})
    assert r.status_code == 400 and r.json()["error"] == "The field 'beam_size' is given 2 times: send it once."
    r = c.post("/v1/caption", files=files(RED, GREEN), data={"beam_size": "2", "num_captions": "2"})
    assert r.status_code == 200 and [len(x["captions"]) for x in r.json()["results"]] == [2, 2]


def test_a_jpeg_of_many_scans_is_refused_before_it_holds_the_decoders(client_for):
    """Each scan of a progressive JPEG is a pass over every pixel: a 131 KB file repeating its last scan 800
    times held both decode threads past every request's deadline."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 10, 220)).save(buf, "JPEG", progressive=True)
    good = buf.getvalue()
    last = good.rindex(b"\xff\xda")
    bomb = good[:-2] + good[last:-2] * 150 + b"\xff\xd9"  # the last scan again and again, then the end
    c = client_for(StandIn(), max_wait_ms=1)
    r = c.post("/v1/caption", files=[("images", ("scans.jpg", bomb, "image/jpeg"))])
    assert r.status_code == 422 and "JPEG of 1" in r.json()["error"] and "scans" in r.json()["error"], r.text
    r = c.post("/v1/caption", files=[("images", ("progressive.jpg", good, "image/jpeg"))])
    assert r.status_code == 200 and "blue" in r.json()["results"][0]["caption"], r.text


def test_two_servers_started_at_once_on_one_port_one_is_told_before_loading():
    """Both bound with SO_REUSEADDR while neither listened: the second failed in uvicorn's start-up, a
    40-line traceback after the model had loaded."""
    from stage2_decoder.serving.app import listen

    first = listen("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            listen("127.0.0.1", port).close()
    finally:
        first.close()


def test_healthz_names_the_run_folder_of_a_checkpoint_given_from_inside_it(tmp_path, monkeypatch):
    from stage2_decoder.serving.app import checkpoint_name

    (tmp_path / "coco-run").mkdir()
    monkeypatch.chdir(tmp_path / "coco-run")
    assert checkpoint_name("best.pt") == "coco-run/best.pt"
