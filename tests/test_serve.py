"""The captioning web service: the batcher, the app's limits and errors (in process, over a small stand-in
captioner), then the real server in a subprocess on a loopback port with a decoder trained on the shared
cache: captions equal to the API's, bad uploads, 16 concurrent clients, and the page in headless Chromium."""
from __future__ import annotations

import io
from pathlib import Path
import shutil
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from stage2_decoder.serving.app import create_app
from stage2_decoder.serving.batcher import BatcherConfig, DynamicBatcher
from stage2_decoder.serving.page import CSP, PAGE
from stage2_decoder.serving.settings import ServeConfig
from test_serve_limits import StandIn  # the captioner's serving interface over mean colours

# --- the batcher -------------------------------------------------------------------------------------------


class Recorder:
    """A batched function that answers each item with (item, key) and records the batches it saw."""

    def __init__(self, delay: float = 0.0):
        self.batches, self.delay = [], delay

    def __call__(self, items, key):
        self.batches.append((list(items), key))
        time.sleep(self.delay)
        return [(it, key) for it in items]


def _submit_together(batcher, jobs):
    """Submit (items, key) jobs from one thread each, released at once; returns each job's results."""
    go, out = threading.Barrier(len(jobs)), [None] * len(jobs)

    def client(i, items, key):
        go.wait()
        out[i] = batcher.submit(items, key).result(timeout=30)

    threads = [threading.Thread(target=client, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_requests_share_batches_and_each_gets_its_own_results():
    rec = Recorder(delay=0.05)
    b = DynamicBatcher(rec, BatcherConfig(max_batch_images=8, max_wait_ms=300)).start()
    try:
        jobs = [([f"r{i}a", f"r{i}b"], "k") for i in range(8)]
        out = _submit_together(b, jobs)
    finally:
        b.stop()
    assert out == [[(it, "k") for it in items] for items, _ in jobs]
    assert len(rec.batches) < len(jobs)  # gathered
    assert all(len(items) <= 8 for items, _ in rec.batches)
    assert sorted(it for items, _ in rec.batches for it in items) == sorted(it for items, _ in jobs for it in items)
    assert b.stats.calls == len(rec.batches) and b.stats.requests == 8 and b.stats.images == 16


def test_requests_queued_during_a_batch_join_the_next_and_it_waits_for_as_many_as_before():
    release, rec = threading.Event(), Recorder()

    def run(items, key):
        if items == ["a"]:
            release.wait(10)  # the first batch holds the model while b, c, d queue
        return rec(items, key)

    b = DynamicBatcher(run, BatcherConfig(max_batch_images=16, max_wait_ms=1500)).start()
    try:
        first = b.submit(["a"])
        time.sleep(0.2)
        queued = [b.submit([x]) for x in "bcd"]
        release.set()
        assert first.result(10) == [("a", None)] and [f.result(10) for f in queued] == [[(x, None)] for x in "bcd"]
        # the previous batch held 3 requests: the next one waits (up to 1.5 s) until 3 are here, then runs
        # without waiting out the rest of its time (h, 0.2 s later, is not in it)
        late = []
        for x in "efgh":
            late.append(b.submit([x]))
            time.sleep(0.2)
        assert [f.result(10) for f in late] == [[(x, None)] for x in "efgh"]
    finally:
        b.stop()
    assert [items for items, _ in rec.batches] == [["a"], ["b", "c", "d"], ["e", "f", "g"], ["h"]]


def test_batching_off_runs_one_request_per_call_and_keys_never_mix():
    rec = Recorder()
    b = DynamicBatcher(rec, BatcherConfig(max_batch_images=64, max_wait_ms=300, enabled=False)).start()
    try:
        out = _submit_together(b, [([i], "k") for i in range(5)])
    finally:
        b.stop()
    assert out == [[(i, "k")] for i in range(5)] and len(rec.batches) == 5

    rec = Recorder()
    b = DynamicBatcher(rec, BatcherConfig(max_batch_images=64, max_wait_ms=300)).start()
    try:
        out = _submit_together(b, [([i], i % 2) for i in range(6)])
    finally:
        b.stop()
    assert out == [[(i, i % 2)] for i in range(6)]
    assert all(all(it % 2 == key for it in items) for items, key in rec.batches)


def test_requests_of_three_settings_with_array_items_are_all_answered():
    """With three or more decoding settings in flight, taking a held job out of the hold compared jobs field by
    field: their image arrays, "truth value of an array is ambiguous", a 500 for some and a 30 s wait for the
    batch already gathered."""
    gate = threading.Event()

    def run(items, key):
        if key == 0:
            gate.wait(10)  # the model is busy while the others queue and are held by setting
        return [float(it.sum()) + key for it in items]

    b = DynamicBatcher(run, BatcherConfig(max_batch_images=8, max_wait_ms=200)).start()
    try:
        first = b.submit([np.zeros(2)], 0)
        time.sleep(0.1)
        keys = [1, 2, 3, 2, 3, 1, 3]
        futures = [b.submit([np.full(2, i, dtype=np.float32)], k) for i, k in enumerate(keys)]
        gate.set()
        first.result(10)
        assert [f.result(10) for f in futures] == [[2.0 * i + k] for i, k in enumerate(keys)]
    finally:
        gate.set()
        b.stop()


def test_a_failure_while_gathering_answers_every_request_taken_into_the_batch(monkeypatch):
    """A bug in the batcher itself fails the requests it holds at once: none waits out its deadline."""
    import stage2_decoder.serving.batcher as batcher_mod

    gate = threading.Event()
    b = DynamicBatcher(lambda items, key: (gate.wait(10), items)[1], BatcherConfig(max_batch_images=8,
                                                                                   max_wait_ms=300))
    real = batcher_mod.DynamicBatcher._prepare

    def failing(self, batch):
        if len(batch) >= 2:  # the second job joining the batch being gathered
            raise RuntimeError("batcher bug")
        return real(self, batch)

    monkeypatch.setattr(batcher_mod.DynamicBatcher, "_prepare", failing)
    b.start()
    try:
        busy = b.submit(["busy"], "k")
        time.sleep(0.1)
        futures = [b.submit([i], "k") for i in range(3)]  # queued while the model is busy: one gather takes them
        gate.set()
        assert busy.result(5) == ["busy"]
        failed = 0
        for i, f in enumerate(futures):  # each answered at once: the failed batch's jobs, then the rest
            try:
                assert f.result(5) == [i]
            except RuntimeError as e:
                assert "batcher bug" in str(e)
                failed += 1
        assert failed >= 2
    finally:
        gate.set()
        b.stop()


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on():
    def run(items, key):
        if "bad" in items:
            raise RuntimeError("model broke")
        return [it.upper() for it in items]

    b = DynamicBatcher(run, BatcherConfig(max_wait_ms=0)).start()
    try:
        with pytest.raises(RuntimeError, match="model broke"):
            b.submit(["bad"]).result(timeout=10)
        assert b.submit(["ok"]).result(timeout=10) == ["OK"]
    finally:
        b.stop()
    with pytest.raises(RuntimeError, match="not running"):
        b.submit(["late"])


def test_prepared_items_reach_run_each_with_its_own_request():
    """The CPU encoder's place: `prepare` runs on each request's items as they join (in passes shared by
    several requests), `run` gets the prepared items, and every request its own results back."""
    passes, rec = [], Recorder(delay=0.02)

    def prepare(items):
        passes.append(list(items))
        return [f"p{it}" for it in items]

    b = DynamicBatcher(rec, BatcherConfig(max_batch_images=16, max_wait_ms=300), prepare=prepare,
                       prepare_threads=2).start()
    try:
        jobs = [([f"r{i}a", f"r{i}b"] if i % 3 else [f"r{i}"], "k") for i in range(12)]
        out = _submit_together(b, jobs)
    finally:
        b.stop()
    assert out == [[(f"p{it}", "k") for it in items] for items, _ in jobs]
    assert sorted(it for p_ in passes for it in p_) == sorted(it for items, _ in jobs for it in items)  # once each
    assert any(len(p_) > 1 for p_ in passes) and len(rec.batches) < len(jobs)


def test_a_request_whose_items_fail_to_prepare_fails_alone():
    def prepare(items):
        if "bad" in items:
            raise ValueError("cannot encode")
        return [it.upper() for it in items]

    b = DynamicBatcher(lambda items, key: items, BatcherConfig(max_batch_images=16, max_wait_ms=300),
                       prepare=prepare).start()
    try:
        futures = [b.submit(items) for items in (["a"], ["bad"], ["c", "d"])]
        assert futures[0].result(10) == ["A"] and futures[2].result(10) == ["C", "D"]
        with pytest.raises(ValueError, match="cannot encode"):
            futures[1].result(10)
        assert b.submit(["e"]).result(10) == ["E"]
    finally:
        b.stop()


def test_the_next_batch_is_prepared_while_one_runs_and_passes_run_side_by_side():
    """With batching on, `run` has a thread of its own and `prepare` passes a pool: a run that waits for the
    next batch's prepare, and two passes that wait for each other, both finish (one thread would hang)."""
    next_prepared, side_by_side = threading.Event(), threading.Barrier(2, timeout=5)
    second_queued = threading.Event()

    def prepare(items):
        if items == ["first"]:
            second_queued.wait(5)  # a lone request runs start to end in the batcher thread: not this one
        if items[0].startswith("pair"):
            side_by_side.wait()  # BrokenBarrierError unless another pass runs at the same time
        if items == ["second"]:
            next_prepared.set()
        return items

    def run(items, key):
        if items == ["first"]:
            assert next_prepared.wait(5), "the next batch was not prepared while this one ran"
        return items

    b = DynamicBatcher(run, BatcherConfig(max_batch_images=1, max_wait_ms=0), prepare=prepare,
                       prepare_threads=2).start()
    try:
        first = b.submit(["first"])
        time.sleep(0.2)
        second = b.submit(["second"])
        second_queued.set()
        assert second.result(10) == ["second"] and first.result(10) == ["first"]
    finally:
        b.stop()
    gate = threading.Event()

    def prepare_held(items):
        if items == ["hold", "hold"]:
            gate.wait(5)  # a batch of its own (2 images): the batcher waits for it while both pairs queue
        return prepare(items)

    b = DynamicBatcher(lambda items, key: items, BatcherConfig(max_batch_images=2, max_wait_ms=2000),
                       prepare=prepare_held, prepare_threads=2).start()
    try:
        held = b.submit(["hold", "hold"])
        time.sleep(0.2)
        futures = [b.submit([f"pair{i}"]) for i in range(2)]
        gate.set()
        assert held.result(10) == ["hold", "hold"] and [f.result(10) for f in futures] == [["pair0"], ["pair1"]]
    finally:
        b.stop()


def test_a_lone_request_on_an_idle_batcher_runs_in_one_thread():
    """Hand-overs cost a lone request several ms: with nothing else waiting, it is prepared and run by the
    batcher thread itself; overlapping requests use the pool and the runner."""
    threads = []

    def prepare(items):
        threads.append(("prepare", threading.current_thread().name))
        return items

    def run(items, key):
        threads.append(("run", threading.current_thread().name))
        return items

    b = DynamicBatcher(run, BatcherConfig(max_wait_ms=0), prepare=prepare, prepare_threads=2).start()
    try:
        for x in "ab":
            assert b.submit([x]).result(10) == [x]
    finally:
        b.stop()
    assert threads == [("prepare", "caption-batcher"), ("run", "caption-batcher")] * 2


def test_batcher_settings_are_checked():
    with pytest.raises(ValueError, match="max_batch_images"):
        BatcherConfig(max_batch_images=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        BatcherConfig(max_wait_ms=-1)


# --- the app, in process, over a stand-in captioner ---------------------------------------------------------


def _jpeg(w=32, h=24, colour=(200, 30, 40), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def client():
    with warnings.catch_warnings():  # starlette's note that its TestClient will move to httpx2
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    from stage2_decoder.decoding.config import DecodeConfig

    cfg = ServeConfig(max_files=3, max_upload_mb=0.05, max_pixels=200 * 200, max_wait_ms=1,
                      decode=DecodeConfig(beam_size=2, max_len=7, length_penalty=0.5))
    with TestClient(create_app(StandIn(), cfg)) as c:
        c.stand_in = c.app.state.captioner
        yield c


def _good(client):
    r = client.post("/v1/caption", files=[("images", ("ok.jpg", _jpeg(), "image/jpeg"))])
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["caption"].startswith("a red photo")
    return r


def test_caption_endpoint_answers_each_file_in_order_with_its_alternatives(client):
    files = [("images", ("red.jpg", _jpeg(colour=(250, 0, 0)), "image/jpeg")),
             ("images", ("blue.png", _jpeg(40, 10, (0, 0, 250), "PNG"), "image/png"))]
    r = client.post("/v1/caption", files=files, data={"num_captions": "3", "beam_size": "4"})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["filename"] for x in res] == ["red.jpg", "blue.png"]
    assert res[0]["caption"].startswith("a red photo") and res[1]["caption"].startswith("a blue photo")
    assert all(len(x["captions"]) == 3 and x["captions"][0]["caption"] == x["caption"] for x in res)
    assert client.stand_in.calls[-1] == ["red", "blue"]  # one model call for the request
    beam, decode = client.stand_in.settings[-1]
    assert beam == 4 and decode["max_len"] == 7 and decode["length_penalty"] == 0.5  # server settings
    _good(client)
    assert client.stand_in.settings[-1][0] == 2  # the server's default beam when the request names none
    assert client.get("/healthz").json() == {"status": "ok", "checkpoint": "tiny/best.pt"}


def _noise_jpeg() -> bytes:
    """A 64x64 JPEG of noise: its header is whole in the first few hundred bytes, its pixels are not."""
    import numpy as np

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_claiming(w: int, h: int) -> bytes:
    """A small PNG whose header says w x h pixels (a decompression bomb's shape): only the header is real."""
    import struct
    import zlib

    png = _jpeg(1, 1, fmt="PNG")
    ihdr = b"IHDR" + struct.pack(">II", w, h) + png[24:29]  # width, height, then depth/colour/methods as given
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


BAD_REQUESTS = [
    # (what, request kwargs, status, words the error must contain)
    ("not an image", {"files": [("images", ("notes.jpg", b"just some text, no photo", "image/jpeg"))]}, 415,
     ["notes.jpg", "not an image"]),
    ("truncated image", {"files": [("images", ("cut.jpg", _noise_jpeg()[:1500], "image/jpeg"))]}, 422,
     ["cut.jpg", "not a readable image"]),
    ("too many bytes", {"files": [("images", ("big.png", bytes(_jpeg(5, 5, fmt="PNG")) + b"\0" * 60_000,
                                              "image/png"))]}, 413, ["big.png is 59 KB, over the limit of 51 KB"]),
    ("too many pixels", {"files": [("images", ("huge.png", _jpeg(300, 300, fmt="PNG"), "image/png"))]}, 413,
     ["huge.png", "300x300", "pixels"]),
    ("a bomb's header", {"files": [("images", ("bomb.png", _png_claiming(40000, 40000), "image/png"))]}, 413,
     ["bomb.png", "pixels"]),
    ("over --max-pixels, under Pillow's limit", {"files": [("images", ("wide.png", _png_claiming(1000, 1000),
                                                                       "image/png"))]}, 413,
     ["wide.png is 1000x1000 pixels, over the limit of 40,000"]),
    ("too many files", {"files": [("images", (f"{i}.jpg", _jpeg(), "image/jpeg")) for i in range(4)]}, 413,
     ["More than 3 files"]),
    ("one bad file among good ones", {"files": [("images", ("fine.jpg", _jpeg(), "image/jpeg")),
                                                ("images", ("broken.gif", b"GIF89a nonsense", "image/gif"))]}, 415,
     ["broken.gif"]),
    ("bad num_captions", {"files": [("images", ("ok.jpg", _jpeg(), "image/jpeg"))], "data": {"num_captions": "two"}},
     400, ["num_captions", "two"]),
    ("num_captions over the limit", {"files": [("images", ("ok.jpg", _jpeg(), "image/jpeg"))],
                                     "data": {"num_captions": "1000"}}, 400, ["num_captions", "1000"]),
    ("bad beam_size", {"files": [("images", ("ok.jpg", _jpeg(), "image/jpeg"))], "data": {"beam_size": "0"}}, 400,
     ["beam_size"]),
    ("no files in 'images'", {"files": [("photo", ("ok.jpg", _jpeg(), "image/jpeg"))], "data": {"beam_size": "3"}},
     400, ["'images'"]),
    ("not multipart", {"json": {"images": []}}, 415, ["multipart"]),
]


@pytest.mark.parametrize("what,kwargs,status,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_json_error_naming_the_fault_and_the_server_goes_on(client, what, kwargs, status,
                                                                                   words):
    r = client.post("/v1/caption", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert all(w in err for w in words), err
    assert "Error" not in err and err.endswith(".")  # one plain sentence, no exception chain
    _good(client)


def test_a_body_larger_than_the_limits_is_refused_before_it_is_read(client):
    body = b"x" * (3 * int(0.05 * (1 << 20)) + (2 << 20))
    r = client.post("/v1/caption", content=body, headers={"content-type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    _good(client)


def test_the_page_is_self_contained_and_inserts_text_as_text(client):
    r = client.get("/")
    assert r.status_code == 200 and r.text == PAGE
    assert r.headers["content-security-policy"] == CSP
    assert "default-src 'none'" in CSP and "unsafe-inline" not in CSP and "connect-src 'self'" in CSP
    assert "http://" not in PAGE and "https://" not in PAGE and "//cdn" not in PAGE
    assert "innerHTML" not in PAGE and "insertAdjacentHTML" not in PAGE and "document.write" not in PAGE
    assert 'type="file"' in PAGE and "drop" in PAGE and "textContent" in PAGE
    assert "prepend" not in PAGE and "cards.append(card)" in PAGE  # cards in the order chosen
    assert "alts.start = 2" in PAGE and "Retry-After" in PAGE
    assert client.head("/").status_code == 200


def test_serve_settings_are_checked():
    for bad in ({"max_batch": 0}, {"port": 70000}, {"max_upload_mb": 0}, {"max_beam_size": 2},
                {"num_captions": 50}):
        with pytest.raises(ValueError):
            ServeConfig(**bad)


# --- the real server, on a loopback port, with a decoder trained on the shared cache ------------------------

from test_figures import Chromium, chromium_exe  # noqa: E402,F401 - the gallery test's headless browser

PHOTOS = 8


@pytest.fixture(scope="module")
def checkpoint(shared_cache, tmp_path_factory):
    """A small decoder trained for a few (fast) epochs on the shared 48-image cache."""
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    out = tmp_path_factory.mktemp("serve") / "run"
    train(TrainConfig(features=str(shared_cache), out=str(out), epochs=10, scst_epochs=0, batch_size=32, lr=5e-3,
                      embed_size=64, hidden_size=128, vocab_threshold=2, select_by="loss", device="cpu",
                      progress=False))
    return out / "best.pt"


@pytest.fixture(scope="module")
def photos(coco_records):
    return [r.path for r in coco_records[:PHOTOS]]


@pytest.fixture(scope="module")
def captioner(checkpoint):
    from stage2_decoder import Captioner

    return Captioner.load(checkpoint, device="cpu")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint):
    """`python -m stage2_decoder.serve` in a subprocess on a free loopback port; yields its base URL."""
    import os
    import subprocess
    import sys

    import httpx

    from conftest import REPO, TEST_THREADS

    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=TEST_THREADS, MKL_NUM_THREADS=TEST_THREADS)
    proc = subprocess.Popen([sys.executable, "-m", "stage2_decoder.serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), "--device", "cpu", "--max-files", "4", "--max-upload-mb", "1",
                             "--max-pixels", "1000000", "--max-wait-ms", "20", "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not answer /healthz within 120 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = proc.stdout.read()
    assert "Traceback" not in out, out
    assert proc.returncode == 0, out  # SIGTERM: the requests in progress are answered, then a clean exit


def _post(url, paths, **fields):
    import httpx

    files = [("images", (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p in paths]
    return httpx.post(url + "/v1/caption", files=files, data={k: str(v) for k, v in fields.items()}, timeout=120)


def test_batching_never_changes_a_caption(captioner, photos):
    """One batched call gives every photo the caption and alternatives it gets alone (BatchNorm in eval mode)."""
    together = captioner.caption(photos, num_captions=3, batch_size=len(photos))
    alone = [captioner.caption([p], num_captions=3)[0] for p in photos]
    assert [[c["caption"] for c in r["captions"]] for r in together] == [[c["caption"] for c in r["captions"]]
                                                                         for r in alone]
    assert [c["score"] for r in together for c in r["captions"]] == pytest.approx(
        [c["score"] for r in alone for c in r["captions"]], abs=1e-4)
    assert len({r["caption"] for r in alone}) > 1  # the photos are told apart: the check can fail


class CountingBackbone:
    """A backbone that records the batch size of each encoder pass."""

    def __init__(self, backbone):
        self._backbone, self.passes = backbone, []

    def __getattr__(self, name):
        return getattr(self._backbone, name)

    def encode(self, images_u8):
        self.passes.append(images_u8.shape[0])
        return self._backbone.encode(images_u8)


def test_one_8_photo_request_is_one_model_call(captioner, photos):
    """`caption` and the service make one pass per batch (only the CLI's folder path splits off a first chunk)."""
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    cap = copy.copy(captioner)
    cap.backbone = CountingBackbone(captioner.backbone)
    cap.caption(photos, batch_size=len(photos))
    assert cap.backbone.passes == [8]
    cap.backbone.passes.clear()
    with TestClient(create_app(cap, ServeConfig(max_wait_ms=0))) as c:
        files = [("images", (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p in photos]
        r = c.post("/v1/caption", files=files)
        stats = c.get("/v1/stats").json()
    assert r.status_code == 200 and len(r.json()["results"]) == 8
    assert cap.backbone.passes == [8] and stats["model_calls"] == 1 and stats["largest_batch"] == 8
    want = captioner.caption(photos)
    assert [x["caption"] for x in r.json()["results"]] == [w["caption"] for w in want]


def test_chunked_encoder_gives_the_whole_batch_features(captioner, photos):
    import torch

    from common.backbones import load_image_u8
    from stage2_decoder.serving.app import ChunkedEncoder

    x = torch.stack([load_image_u8(p, captioner.backbone.preprocess) for p in photos])  # (8, 3, 224, 224)
    chunked = ChunkedEncoder(captioner.backbone, 3)
    assert chunked.preprocess == captioner.backbone.preprocess and chunked.feature_dim == captioner.backbone.feature_dim
    torch.testing.assert_close(chunked.encode(x), captioner.backbone.encode(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked.encode(x[:2]), captioner.backbone.encode(x[:2]))


def test_real_server_captions_photos_as_the_api_does(server, captioner, photos, checkpoint):
    import httpx

    assert httpx.get(server + "/healthz").json() == {"status": "ok", "checkpoint": f"{checkpoint.parent.name}/best.pt"}
    r = _post(server, photos[:4], num_captions=3, beam_size=3)
    assert r.status_code == 200, r.text
    want = captioner.caption(photos[:4], num_captions=3, beam_size=3)
    got = r.json()["results"]
    assert [g["filename"] for g in got] == [Path(p).name for p in photos[:4]]
    assert [g["caption"] for g in got] == [w["caption"] for w in want]
    assert [[c["caption"] for c in g["captions"]] for g in got] == [[c["caption"] for c in w["captions"]] for w in want]
    assert [c["score"] for g in got for c in g["captions"]] == pytest.approx(
        [c["score"] for w in want for c in w["captions"]], abs=1e-4)
    greedy = _post(server, photos[4:5], beam_size=1).json()["results"][0]
    assert greedy["caption"] == captioner.caption(photos[4:5], beam_size=1)[0]["caption"]
    assert len(greedy["captions"]) == 1


def test_real_server_refuses_bad_uploads_and_keeps_serving(server, photos, tmp_path):
    import httpx

    photo = Path(photos[0]).read_bytes()
    bad = [
        ([("images", ("notes.txt", b"not a photo at all", "text/plain"))], 415, "notes.txt"),
        ([("images", ("half.jpg", photo[:len(photo) // 3], "image/jpeg"))], 422, "half.jpg"),
        ([("images", (f"{i}.jpg", photo, "image/jpeg")) for i in range(5)], 413, "More than 4 files"),
        ([("images", ("big.jpg", photo + b"\0" * (1 << 20), "image/jpeg"))], 413, "big.jpg"),
    ]
    for files, status, words in bad:
        r = httpx.post(server + "/v1/caption", files=files, timeout=60)
        assert r.status_code == status and words in r.json()["error"], r.text
        ok = _post(server, photos[:1])
        assert ok.status_code == 200 and ok.json()["results"][0]["caption"], ok.text


def test_16_concurrent_clients_are_all_answered_with_their_own_captions(server, captioner, photos):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    want = {Path(p).name: captioner.caption([p])[0]["caption"] for p in photos}
    jobs = [photos[i % len(photos)] for i in range(16)]
    before = httpx.get(server + "/v1/stats").json()
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda p: _post(server, [p]), jobs))
    after = httpx.get(server + "/v1/stats").json()
    assert after["requests"] - before["requests"] == 16
    assert after["model_calls"] - before["model_calls"] < 16 and after["largest_batch"] > 1  # they shared batches
    assert [r.status_code for r in replies] == [200] * 16, [r.text for r in replies if r.status_code != 200]
    for p, r in zip(jobs, replies):
        res = r.json()["results"][0]
        assert res["filename"] == Path(p).name and res["caption"] == want[Path(p).name]


_CARDS_JS = """Array.from(document.querySelectorAll('#cards .card')).map(c => ({
    state: c.classList.contains('done') ? 'done' : c.classList.contains('failed') ? 'failed' : 'pending',
    name: c.querySelector('.name').textContent, caption: c.querySelector('.caption').textContent,
    alts: c.querySelectorAll('.alts li').length, bold: c.querySelectorAll('b').length,
    score: c.querySelector('.score').textContent, start: c.querySelector('.alts').start,
    altTexts: Array.from(c.querySelectorAll('.alts li')).map(li => li.textContent),
    img: (i => i.complete && i.naturalWidth > 0)(c.querySelector('img'))}))"""


def test_the_page_in_a_real_browser_captions_a_photo_picked_with_the_file_input(server, captioner, photos,
                                                                                chromium_exe, tmp_path):
    import shutil

    odd = tmp_path / "<b>bold<b> & <i>photo.jpg"  # a name that is markup: it must show as text
    shutil.copyfile(photos[1], odd)
    not_photo = tmp_path / "notes.jpg"
    not_photo.write_text("a shopping list, not a photo")
    browser = Chromium(chromium_exe, tmp_path / "chromium-profile")
    try:
        sid = browser.open(server + "/", 1100, 800)
        root = browser.send("DOM.getDocument", {}, session=sid)["root"]["nodeId"]
        node = browser.send("DOM.querySelector", {"nodeId": root, "selector": "#files"}, session=sid)["nodeId"]
        browser.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(photos[0]), str(odd), str(not_photo)]}, session=sid)
        deadline = time.monotonic() + 60
        while True:
            cards = browser.js(sid, _CARDS_JS)
            if len(cards) == 3 and all(c["state"] != "pending" for c in cards) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        problems = browser.problems()
    finally:
        browser.close()
    # the refused upload's 415 is logged by the browser as a failed load; nothing else may be
    assert [p for p in problems if "status of 415" not in p] == [], problems
    assert [c["name"] for c in cards] == [Path(photos[0]).name, odd.name, not_photo.name]  # the order chosen
    by_name = {c["name"]: c for c in cards}
    assert set(by_name) == {Path(photos[0]).name, odd.name, not_photo.name}, cards
    refused = by_name[not_photo.name]
    assert refused["state"] == "failed" and "notes.jpg" in refused["caption"] and "not an image" in refused["caption"]
    assert "Error" not in refused["caption"]  # one plain sentence, no exception chain
    want = captioner.caption([photos[0], photos[1]], num_captions=3, beam_size=3)  # the page's defaults
    for name, w in zip([Path(photos[0]).name, odd.name], want):
        c = by_name[name]
        assert c["state"] == "done" and c["caption"] == w["caption"] and c["img"], c
        assert c["alts"] == len(w["captions"]) - 1 and c["bold"] == 0
        # scores shown to 2 decimals: within rounding (0.005) plus batching's float noise (1e-4)
        assert c["score"].startswith("score ") and c["start"] == 2  # the alternatives are the 2nd, 3rd, ...
        assert float(c["score"].split()[1]) == pytest.approx(w["captions"][0]["score"], abs=0.006)
        shown = [t.rsplit(" (score ", 1) for t in c["altTexts"]]
        assert [t for t, _ in shown] == [a["caption"] for a in w["captions"][1:]]
        assert [float(v.rstrip(")")) for _, v in shown] == pytest.approx([a["score"] for a in w["captions"][1:]],
                                                                         abs=0.006)


def test_serve_cli_dry_run_bad_settings_and_no_checkpoint(checkpoint, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from stage2_decoder.serve import main

    ok = CliRunner().invoke(main, ["--checkpoint", str(checkpoint), "--dry-run", "--port", "0", "--device", "cpu"])
    assert ok.exit_code == 0 and "would serve" in ok.stdout, ok.output
    bad = CliRunner().invoke(main, ["--checkpoint", str(checkpoint), "--dry-run", "--max-batch", "0"])
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: --max-batch must be between 1 and 4096, got 0"
    monkeypatch.delenv("CAPCACHE_CHECKPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    none = CliRunner().invoke(main, ["--dry-run"])
    assert none.exit_code == 1 and len(none.stderr.strip().splitlines()) == 1, none.output
    assert none.stderr.startswith("error: no checkpoint found") and "--checkpoint" in none.stderr
    assert not isinstance(none.exception, Exception) or isinstance(none.exception, SystemExit)


@pytest.mark.slow
def test_bench_serve_tiny_mode_prints_its_table_and_ratios(data_dir, coco_dir, checkpoint):
    import re
    import subprocess
    import sys

    from conftest import REPO, TEST_THREADS

    p = subprocess.run([sys.executable, "bench/serve.py", "--tiny", "--data", str(data_dir), "--threads", TEST_THREADS,
                        "--checkpoint", str(checkpoint)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    rows = re.findall(r"^\s+(\d+)\s+(batching|one at a time)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)"
                      r"\s+([\d.]+)$", p.stdout, re.M)
    assert {(n, mode) for n, mode, *_ in rows} == {(n, m) for n in ("1", "4") for m in ("batching", "one at a time")}
    assert all(float(rps) > 0 and float(p50) <= float(p99) and errors == "0"
               for _, _, rps, p50, p99, _, errors, _ in rows), p.stdout
    assert re.search(r"overload, 16 clients at once.*answered in time \d+%", p.stdout), p.stdout
    assert all(float(per_call) == 1 for _, mode, *_, per_call in rows if mode == "one at a time"), p.stdout
    ratios = dict(re.findall(r"^ratio (serve\.throughput \d+ clients batching/one-at-a-time): (\d+\.\d+)x", p.stdout,
                             re.M))
    assert len(ratios) == 2 and all(float(v) > 0 for v in ratios.values()), p.stdout
    assert re.search(r"^  abandoned \(batching server\): 8 clients gave up after 0\.3 s \(\d+ answered in time\); the "
                     r"next request answered in [\d.]+ s, a lone one in [\d.]+ s; .*: \d+ images$", p.stdout,
                     re.M), p.stdout
    assert re.search(r"^ratio serve\.abandon next request / max\(3 s, 3 x a lone one\): \d+\.\d+x", p.stdout, re.M)
    # the memory case: 120 mixed requests, every fourth one not an image (415), then 16 PNGs in one request
    assert re.search(r"^  memory .*200: 90, 415: 30\): RSS \d+ MB after 100 requests, \d+ MB after 120$", p.stdout,
                     re.M), p.stdout
    assert re.search(r"^  one request of 16 PNGs of 1000 x 1000 .*answered 200\): RSS \d+ MB before, peak \d+ MB",
                     p.stdout, re.M), p.stdout
    assert re.search(r"^ratio serve\.memory RSS after 120 / after 100 mixed requests: \d+\.\d+x", p.stdout, re.M)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ab") is None, reason="ApacheBench (apache2-utils) is not installed")
def test_bench_serve_with_apachebench_as_the_client(data_dir, checkpoint):
    import re
    import subprocess
    import sys

    from conftest import REPO, TEST_THREADS

    p = subprocess.run([sys.executable, "bench/serve.py", "--tiny", "--client", "ab", "--data", str(data_dir),
                        "--threads", TEST_THREADS, "--checkpoint", str(checkpoint), "--flood", "0", "--memory", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "client ab" in p.stdout
    rows = re.findall(r"^\s+(\d+)\s+(batching|one at a time)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)"
                      r"\s+([\d.]+)$", p.stdout, re.M)
    assert len(rows) == 4, p.stdout  # ab's requests were answered 200 (errors 0) and counted per request
    assert all(float(rps) > 0 and float(p50) <= float(p99) and errors == "0" and requests == "8"
               for _, _, rps, p50, p99, requests, errors, _ in rows), p.stdout


def test_a_path_with_a_line_break_or_a_look_alike_content_type_gets_no_past_the_checks(client):
    """/v1/caption%0a reached the endpoint (a router's `$` matches before a final line break) past every
    admission check: no body limit, no deadline, no queue; a content type that only starts like multipart,
    or a second Content-Type header, got 400 instead of 415."""
    r = client.post("/v1/caption%0a", content=b"abc", headers={"content-type": "text/plain"})
    assert r.status_code == 404 and r.json()["error"] == "Not Found"
    r = client.post("/v1/caption", content=b"--x--", headers={"content-type": "multipart/form-dataX; boundary=x"})
    assert r.status_code == 415
    r = client.post("/v1/caption", content=b"abc", headers=[("content-type", "text/plain"),
                                                           ("content-type", "multipart/form-data; boundary=x")])
    assert r.status_code == 415
    _good(client)  # and it goes on serving


def test_too_many_form_fields_or_a_long_one_is_a_413_naming_the_limit(client):
    from stage2_decoder.serving.app import MAX_FIELD_BYTES, MAX_FIELDS

    photo = [("images", ("ok.jpg", _jpeg(), "image/jpeg"))]
    r = client.post("/v1/caption", files=photo, data={f"f{i}": "1" for i in range(MAX_FIELDS + 1)})
    assert r.status_code == 413 and f"More than {MAX_FIELDS} form fields" in r.json()["error"]
    r = client.post("/v1/caption", files=photo, data={"note": "x" * (MAX_FIELD_BYTES + 1)})
    assert r.status_code == 413 and "over 64 KiB" in r.json()["error"]


def test_a_large_png_upload_is_decoded_exactly_as_the_caption_cli_decodes_the_file(coco_dir, tmp_path):
    """A non-JPEG upload 4x the resize or more was box-reduced first: pixels off by up to 6 levels, and now
    and then another caption than `caption` gave the same file (docs/serving.md promises the same)."""
    from PIL import Image

    from common.backbones import preprocess_for
    from common.preprocess import load_views
    from stage2_decoder.serving.uploads import decode_upload

    pp = preprocess_for("mobilenet_v2")
    photo = sorted((coco_dir / "images").iterdir())[3]
    with Image.open(photo) as im:
        im.convert("RGB").resize((1024, 1536), Image.BILINEAR).save(tmp_path / "big.png")
    served = decode_upload("big.png", (tmp_path / "big.png").read_bytes(), pp, 50 << 20, 40_000_000)
    assert np.array_equal(served, load_views(str(tmp_path / "big.png"), pp, 1)[0])
