"""The Python API (`from stage2_decoder import Captioner`) on real photos: the checkpoint lookup, the three
input kinds through stage 1's preprocessing, several captions, sampling, errors, and no <unk> ever."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common.vocab import Vocabulary
from reliability_helpers import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(shared_cache, tmp_path_factory):
    return tiny_run(shared_cache, tmp_path_factory) / "best.pt"


@pytest.fixture(scope="module")
def cap(ckpt):
    from stage2_decoder import Captioner

    return Captioner.load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def photos(coco_records):
    return [coco_records[i].path for i in (0, 5, 11)]


# --- the checkpoint lookup ---------------------------------------------------------------------------------

def _touch(path, mtime):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


def test_find_checkpoint_order(tmp_path, monkeypatch):
    from stage2_decoder.api import find_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAPCACHE_CHECKPOINT", raising=False)
    _touch(tmp_path / "runs" / "old" / "best.pt", 1_000_000)
    newest = _touch(tmp_path / "runs" / "new" / "best.pt", 2_000_000)
    _touch(tmp_path / "runs" / "newer-but-last" / "last.pt", 3_000_000)  # only best.pt counts
    assert find_checkpoint().resolve() == newest.resolve()
    env = _touch(tmp_path / "elsewhere.pt", 500)
    monkeypatch.setenv("CAPCACHE_CHECKPOINT", str(env))
    assert find_checkpoint() == env  # the environment wins over runs/
    explicit = _touch(tmp_path / "mine.pt", 100)
    assert find_checkpoint(explicit) == explicit  # an explicit path wins over both


def test_find_checkpoint_says_what_to_do_when_there_is_none(tmp_path, monkeypatch):
    from stage2_decoder.api import NoCheckpointError, find_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAPCACHE_CHECKPOINT", raising=False)
    with pytest.raises(NoCheckpointError) as e:
        find_checkpoint()
    msg = str(e.value)
    assert "\n" not in msg and all(s in msg for s in ("make demo", "make train", "--checkpoint", "CAPCACHE_CHECKPOINT"))
    monkeypatch.setenv("CAPCACHE_CHECKPOINT", str(tmp_path / "gone.pt"))
    with pytest.raises(NoCheckpointError, match="gone.pt"):
        find_checkpoint()
    with pytest.raises(NoCheckpointError, match="absent.pt"):
        find_checkpoint(tmp_path / "absent.pt")


def test_package_import_is_cheap_and_captioner_is_lazy():
    code = ("import sys, stage2_decoder; assert 'stage2_decoder.api' not in sys.modules; "
            "from stage2_decoder import Captioner; from stage2_decoder.api import find_checkpoint; "
            "assert 'torch' not in sys.modules, 'importing the API pulled in torch'; print(Captioner.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "stage2_decoder.api"


# --- inputs ------------------------------------------------------------------------------------------------

def test_path_pil_and_array_give_the_same_features_and_caption(cap, photos):
    """A path, its PIL image (opened here) and its HxWx3 array go through one preprocessing path."""
    from common.backbones import load_image_u8, preprocess_pil

    pp = cap.backbone.preprocess
    for path in photos:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
            from_pil = preprocess_pil(im, pp)[0]
        from_file = load_image_u8(path, pp)
        from_array = preprocess_pil(Image.fromarray(arr), pp)[0]
        assert torch.equal(from_file, from_pil) and torch.equal(from_file, from_array), path
    pil = [Image.open(p) for p in photos]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
    mixed = [photos[0], pil[1], arrays[2]]
    by_path, by_pil, by_array, by_mix = (cap.caption(x, beam_size=2) for x in (photos, pil, arrays, mixed))
    assert [r["caption"] for r in by_path] == [r["caption"] for r in by_pil] == [r["caption"] for r in by_array]
    assert [r["caption"] for r in by_mix] == [r["caption"] for r in by_path]
    assert [r["image"] for r in by_mix] == [photos[0], None, None]  # the path as given; None otherwise
    for im in pil:
        im.close()


def test_caller_images_are_left_as_they_were(cap, photos):
    im = Image.open(photos[0]).convert("L")  # not RGB: converted inside, not here
    arr = np.asarray(Image.open(photos[1]).convert("RGB")).copy()
    before = arr.copy()
    cap.caption([im, arr], beam_size=1)
    assert im.mode == "L" and np.array_equal(arr, before)


def test_unreadable_images_raise_or_are_returned(cap, photos, tmp_path):
    from common.preprocess import ImageError

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageError, match="broken.jpg"):
        cap.caption([photos[0], bad])
    wrong = np.zeros((4, 4), dtype=np.uint8)
    out = cap.caption([photos[0], str(bad), wrong, photos[1]], on_error="return", batch_size=2)
    assert [r["image"] for r in out] == [photos[0], str(bad), None, photos[1]]
    assert "broken.jpg" in out[1]["error"] and "\n" not in out[1]["error"] and "caption" not in out[1]
    assert "HxWx3" in out[2]["error"]
    assert out[0]["caption"] and out[3]["caption"]
    assert out[0]["caption"] == cap.caption([photos[0]])[0]["caption"]  # batching changes nothing


def test_odd_inputs_are_one_input_each_with_one_plain_error(cap, photos):
    """An open file or a bytearray was iterated (line by line, byte by byte) into dozens of inputs; a PIL
    image's error was wrapped twice ("ImageError: image: ValueError: ..."); a 0x0 image read
    "ZeroDivisionError"."""
    with open(photos[0], "rb") as f, pytest.raises(TypeError, match=r"images\[0\]: .* got BufferedReader"):
        cap.caption(f, on_error="return")  # a wrong kind of input is the caller's bug: raised, not returned
    with pytest.raises(TypeError, match=r"images\[0\]: .* got bytearray"):
        cap.caption(bytearray(b"\xff\xd8 not a photo"), on_error="return")
    out = cap.caption([Image.new("LA", (8, 8)).convert("La"), np.zeros((0, 0, 3), np.uint8)], on_error="return")
    assert out[0]["error"].startswith("images[0]: ValueError: ") and "ImageError" not in out[0]["error"]
    assert out[1]["error"] == "images[1]: ValueError: the image has no pixels (0x0)"


@pytest.mark.parametrize("first_chunk", [0, -1, 2.5, True])
def test_caption_iter_refuses_a_first_chunk_that_is_no_count(cap, photos, first_chunk):
    with pytest.raises(ValueError, match="first_chunk"):
        list(cap.caption_iter(photos, batch_size=2, first_chunk=first_chunk))


@pytest.mark.parametrize("kwargs, says", [({"num_captions": 0}, "num_captions"), ({"top_p": 0.0}, "top_p"),
                                          ({"temperature": -1.0}, "temperature"), ({"beam_size": 0}, "beam_size"),
                                          ({"on_error": "skip"}, "on_error"), ({"batch_size": 0}, "batch_size")])
def test_bad_arguments_name_themselves(cap, photos, kwargs, says):
    with pytest.raises(ValueError, match=says):
        cap.caption(photos[:1], **kwargs)


# --- several captions --------------------------------------------------------------------------------------

def test_num_captions_gives_distinct_beam_hypotheses_best_first(cap, photos):
    from stage2_decoder.decoding.beam import beam_search_nbest
    from stage2_decoder.decoding.config import DecodeConfig

    one = cap.caption(photos, beam_size=4)
    four = cap.caption(photos, beam_size=4, num_captions=4)
    six = cap.caption(photos, beam_size=2, num_captions=6)  # the beam is raised to 6
    for a, b, c in zip(one, four, six):
        assert a["caption"] == a["captions"][0]["caption"] and len(a["captions"]) == 1
        texts = [x["caption"] for x in b["captions"]]
        scores = [x["score"] for x in b["captions"]]
        assert len(texts) == 4 == len(set(texts)) and scores == sorted(scores, reverse=True)
        assert b["caption"] == texts[0] == a["caption"]  # the best is what a single caption gives
        assert len({x["caption"] for x in c["captions"]}) == 6
    feats = cap.backbone.encode(torch.stack([cap._load(p, 0) for p in photos]))
    want = beam_search_nbest(cap.decoder, feats, DecodeConfig(beam_size=4))
    for r, hyps in zip(four, want):  # scores are the beam search's own
        assert [x["score"] for x in r["captions"]] == pytest.approx([s for _, s in hyps])
    no_image = cap.caption_features(feats, beam_size=4, num_captions=4)
    assert no_image == [{k: v for k, v in r.items() if k != "image"} for r in four]


def test_greedy_equals_a_beam_of_one(cap, photos):
    from stage2_decoder.decoding.beam import beam_search_nbest
    from stage2_decoder.decoding.config import DecodeConfig

    feats = cap.backbone.encode(torch.stack([cap._load(p, 0) for p in photos]))
    got = cap.caption_features(feats, beam_size=1)
    want = beam_search_nbest(cap.decoder, feats, DecodeConfig(beam_size=1))
    assert [r["caption"] for r in got] == [cap.vocab.caption(h[0][0]) for h in want]
    assert [r["captions"][0]["score"] for r in got] == pytest.approx([h[0][1] for h in want], abs=1e-4)


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(cap, photos):
    a = cap.caption(photos, sample=True, num_captions=5, seed=3)
    b = cap.caption(photos, sample=True, num_captions=5, seed=3)
    c = cap.caption(photos, sample=True, num_captions=5, seed=4)
    assert a == b and a != c
    for r in a:
        scores = [x["score"] for x in r["captions"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True) and r["caption"] == r["captions"][0]["caption"]
    assert len({x["caption"] for r in a for x in r["captions"]}) > 3  # diverse, not one caption repeated
    greedy = cap.caption(photos, beam_size=1)
    tight = cap.caption(photos, sample=True, num_captions=3, top_p=1e-6, temperature=2.0, seed=0)
    for g, t in zip(greedy, tight):  # only the most likely word survives the nucleus: greedy's choice
        assert {x["caption"] for x in t["captions"]} == {g["caption"]}


# --- no <unk>, ever ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unk_model(shared_cache, tmp_path_factory):
    """A decoder trained briefly with a vocabulary so small that most caption words are <unk>."""
    from stage2_decoder.api import Captioner
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    out = tmp_path_factory.mktemp("unk_run")
    train(TrainConfig(features=str(shared_cache), out=str(out), epochs=2, scst_epochs=0, batch_size=32,
                      embed_size=16, hidden_size=32, vocab_threshold=40, device="cpu", progress=False))
    return Captioner.load(out / "best.pt", device="cpu")


def _old_step(model):
    """`CaptionDecoder.step` as it was: only <pad> and <start> masked."""
    def step(tokens, state):
        h, state = model.lstm(model.embed(tokens).unsqueeze(1), state)
        logits = model.logits(h.squeeze(1)).float()
        logits[:, [Vocabulary.pad_id, Vocabulary.start_id]] = float("-inf")
        return torch.log_softmax(logits, dim=-1), state
    return step


def test_no_unk_from_greedy_beam_or_sampling(unk_model, shared_cache, monkeypatch):
    from common.feature_cache import load_cache
    from stage2_decoder.decoding.beam import beam_search_nbest, greedy
    from stage2_decoder.decoding.config import DecodeConfig
    from stage2_decoder.decoding.sampling import sample_captions

    cap, unk = unk_model, unk_model.vocab.unk_id
    feats = torch.from_numpy(load_cache(shared_cache).features[:16].astype(np.float32))

    def decoded(model):
        ids = greedy(model, feats, 20, 1)
        ids += [h for hyps in beam_search_nbest(model, feats, DecodeConfig(beam_size=3)) for h, _ in hyps]
        ids += [h for hyps in sample_captions(model, feats, 4, seed=0) for h, _ in hyps]
        return ids

    with monkeypatch.context() as m:  # the model really does emit <unk> when it is not masked
        m.setattr(cap.decoder, "step", _old_step(cap.decoder))
        assert any(unk in ids for ids in decoded(cap.decoder))
    assert not any(unk in ids for ids in decoded(cap.decoder))
    texts = [x["caption"] for r in cap.caption_features(feats, num_captions=3) for x in r["captions"]]
    texts += [x["caption"] for r in cap.caption_features(feats, sample=True, num_captions=3) for x in r["captions"]]
    assert texts and not any("<unk>" in t for t in texts) and all(t.strip() for t in texts)


def test_caption_defaults_are_the_decode_configs():
    """Captioner.caption spells its keyword arguments out; their defaults are DecodeConfig's and SampleConfig's."""
    import inspect
    from dataclasses import fields

    from stage2_decoder.api import Captioner
    from stage2_decoder.decoding.config import DecodeConfig, SampleConfig

    params = inspect.signature(Captioner.caption).parameters
    declared = {f.name: f.default for cls in (DecodeConfig, SampleConfig) for f in fields(cls)}
    assert {k: params[k].default for k in declared} == declared
    assert set(params) - set(declared) == {"self", "images", "batch_size", "on_error"}


# --- reading the next batch's files while the model works --------------------------------------------------

def _read_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("capcache-read")]


def test_threaded_reading_gives_what_one_file_after_another_gives(cap, photos, tmp_path):
    from stage2_decoder.api import read_chunks

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    images = [photos[0], str(bad), Image.open(photos[1]), photos[2], np.zeros((4, 4), np.uint8), photos[1], bad]
    bounds = [(0, 2), (2, 5), (5, 7)]
    serial = list(read_chunks(images, bounds, cap._load, "return", threads=0))
    threaded = list(read_chunks(images, bounds, cap._load, "return", threads=3))
    assert len(serial) == len(threaded) == 3
    for (c0, t0, g0, e0), (c1, t1, g1, e1) in zip(serial, threaded):
        assert c0 == c1 and g0 == g1 and e0 == e1
        assert all(torch.equal(a, b) for a, b in zip(t0, t1))
    assert [sorted(e) for *_, e in threaded] == [[1], [2], [1]]  # broken.jpg twice and the 4x4 array
    out = cap.caption(images, on_error="return", batch_size=2)
    assert [r.get("caption") for r in out] == [r.get("caption") for r in
                                               cap.caption_iter(images, 2, "return", read_threads=0)]
    assert not _read_threads()


def test_the_next_batch_is_read_while_the_caller_works_on_this_one(photos):
    import threading

    from stage2_decoder.api import read_chunks

    started = {i: threading.Event() for i in range(6)}

    def load(image, index):
        started[index].set()
        return index

    chunks = read_chunks(photos * 2, [(0, 2), (2, 4), (4, 6)], load, "raise", threads=2)
    chunk, loaded, good, errors = next(chunks)
    assert loaded == [0, 1] and good == [0, 1] and not errors
    # one file after another, nothing of the second batch would be read before it is asked for
    assert started[2].wait(10) and started[3].wait(10)
    assert not started[4].is_set()  # one batch ahead, not more
    assert [c[1] for c in chunks] == [[2, 3], [4, 5]]
    assert not _read_threads()


def test_an_unreadable_file_raises_in_order_and_leaves_no_thread_reading(cap, photos, tmp_path):
    from common.preprocess import ImageError
    from stage2_decoder.api import read_chunks

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    chunks = read_chunks([photos[0], photos[1], photos[2], bad, photos[0]], [(0, 2), (2, 5)], cap._load, "raise", 2)
    assert next(chunks)[2] == [0, 1]  # the first batch comes whole: its error is the second batch's
    with pytest.raises(ImageError, match="broken.jpg"):
        next(chunks)
    assert not _read_threads()
    stopped = read_chunks(photos * 20, [(i, i + 3) for i in range(0, 60, 3)], cap._load, "raise", 2)
    next(stopped)
    stopped.close()  # a caller that stops early (a closed generator)
    assert not _read_threads()


def test_a_numpy_integer_seed_draws_what_the_same_python_int_draws(cap, photos):
    """`seed=np.int64(3)` passed the bounds check and then overflowed: "Python int too large to convert to C
    long" from `seed % 2**64` in numpy's int64."""
    for seed in (np.int64(3), np.uint64(3), np.int32(3)):
        assert cap.caption(photos[:2], sample=True, seed=seed) == cap.caption(photos[:2], sample=True, seed=3)


@pytest.mark.parametrize("bad, says", [
    (torch.zeros(2, 10), "got (2, 10) float32"),  # torch: "mat1 and mat2 shapes cannot be multiplied"
    (torch.zeros(40), "got (40,) float32"),  # torch: "expected 2D or 3D input"
    (np.zeros((1, 40), np.int64), "got (1, 40) int64"),
    ("features", "a (B, D) tensor or array, got str"),  # AttributeError: no attribute 'to'
])
def test_caption_features_says_what_it_takes(cap, bad, says):
    d = cap.decoder.cfg.feature_dim
    with pytest.raises(ValueError, match=r"caption_features: features must be") as e:
        cap.caption_features(bad)
    assert says in str(e.value) and (isinstance(bad, str) or f"(B, {d})" in str(e.value))


def test_caption_features_takes_a_float_array_as_a_tensor(cap):
    feats = np.random.default_rng(0).normal(size=(3, cap.decoder.cfg.feature_dim)).astype(np.float32)
    assert cap.caption_features(feats) == cap.caption_features(torch.from_numpy(feats))
    assert cap.caption_features(feats[:0]) == []


def test_caption_features_refuses_rows_that_are_not_finite(cap):
    """A damaged cache's inf rows were captioned as empty strings, with no error."""
    feats = np.random.default_rng(0).normal(size=(4, cap.decoder.cfg.feature_dim)).astype(np.float32)
    feats[2, 5], feats[3, 0] = np.inf, np.nan
    with pytest.raises(ValueError, match=r"2 row\(s\) hold nan or inf, the first row 2"):
        cap.caption_features(feats)


def test_sampling_from_features_draws_alike_in_every_float_type(cap):
    """bfloat16 features (a GPU cache's) refused sampling (numpy holds no bfloat16), and float64 copies of
    float32 features drew other captions: the draws were keyed on the row's raw bytes."""
    feats = torch.from_numpy(np.random.default_rng(0).normal(size=(2, cap.decoder.cfg.feature_dim)).astype(np.float32))
    feats = feats.bfloat16().float()  # values every type below holds exactly
    kw = dict(sample=True, seed=5, num_captions=3)
    want = cap.caption_features(feats, **kw)
    for dtype in (torch.float64, torch.bfloat16):
        got = cap.caption_features(feats.to(dtype), **kw)
        assert [r["caption"] for r in got] == [r["caption"] for r in want], dtype


def test_load_takes_none_or_a_torch_device_and_refuses_other_things(ckpt):
    from stage2_decoder import Captioner

    assert Captioner.load(ckpt, device=None).decoder.out_bias.device.type in ("cpu", "cuda")
    assert Captioner.load(ckpt, device=torch.device("cpu")).decoder.out_bias.device.type == "cpu"
    with pytest.raises(ValueError, match="is not a device"):  # torch: TypeError "invalid combination"
        Captioner.load(ckpt, device=1)


def test_a_captioner_loaded_before_a_fork_captions_in_the_child(ckpt, photos):
    """gunicorn --preload, a multiprocessing 'fork' pool: the model is loaded once, then the process forks.
    GNU OpenMP's thread pool does not survive a fork: a child that ran torch on several threads hung for
    ever in its first encoder pass. Children now caption on one thread."""
    script = f"""
import os, sys
import torch
torch.set_num_threads(2)
from stage2_decoder import Captioner
cap = Captioner.load({str(ckpt)!r}, device="cpu")
torch.ones(1000, 1000) @ torch.ones(1000, 1000)  # the parent's thread pool is started
pid = os.fork()
if pid == 0:
    out = cap.caption([{photos[0]!r}], beam_size=1)
    os._exit(0 if out[0]["caption"] else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
    except subprocess.TimeoutExpired:
        pytest.fail("the forked child hung in its first caption")
    assert done.returncode == 0, done.stderr[-2000:]
