"""CPU guards for the host syncs and faults that only a GPU would feel: the decoding step's special-word mask,
n-gram blocking on the device, SCST's sampling loop and its non-finite check, best.pt without the CUDA
generators, stage 1's workers and its frozen CNN cast once. Each checks on the CPU the property a GPU run
depends on (the counts the GPU itself gives are bench/gpu.py's)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from host_reads import HostReads
from stage2_decoder.model import CaptionDecoder, DecoderConfig


class ListIndexing(TorchFunctionMode):
    """Counts indexing with a Python list (torch turns the list into an index tensor: an upload on CUDA)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__setitem__", "__getitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            self.n += any(isinstance(i, list) for i in index)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def gpu_cadence(monkeypatch):
    """The decoding loops' "all ended?" cadence on a GPU (every DONE_CHECK_EVERY steps), on the CPU (which reads
    every step): what the host-read counts below are about."""
    from stage2_decoder.decoding import beam, sampling
    from stage2_decoder.training import scst

    for mod in (beam, sampling, scst):
        monkeypatch.setattr(mod, "done_check_every", lambda device: beam.DONE_CHECK_EVERY)


def _decoder(**kw) -> CaptionDecoder:
    torch.manual_seed(0)
    return CaptionDecoder(DecoderConfig(**{**dict(feature_dim=32, vocab_size=40, embed_size=16, hidden_size=24,
                                                  num_layers=2, dropout=0.0, tie_embeddings=True), **kw}))


# --- the decoding step's mask ------------------------------------------------------------------------------

def test_a_decoding_step_masks_the_special_words_without_a_python_list_index():
    from common.vocab import Vocabulary

    m = _decoder().eval()
    feats = torch.randn(5, 32)
    state = m.init_state(feats)
    with ListIndexing() as mode, torch.inference_mode():
        logp, _ = m.step(torch.full((5,), Vocabulary.start_id), state)
    assert mode.n == 0
    special = [Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id]
    assert torch.isinf(logp[:, special]).all() and torch.isfinite(logp[:, 4:]).all()
    # the other words: log_softmax over the same finite logits (masking writes -inf, no arithmetic)
    with torch.inference_mode():
        h, _ = m.run_lstm(m.embed(torch.full((5,), Vocabulary.start_id)).unsqueeze(1), state)
        logits = m.logits(h.squeeze(1)).float()
        logits[:, special] = float("-inf")
    assert torch.equal(logp, torch.log_softmax(logits, -1))


def test_the_mask_is_not_in_the_state_dict_and_old_checkpoints_load_strictly():
    m = _decoder()
    assert "banned_words" not in m.state_dict()
    old_keys = ["project.weight", "project.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                "bn.num_batches_tracked", "embed.weight", "out_proj.weight", "out_proj.bias", "out_bias"]
    state = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("lstm.")}
    assert sorted(state) == sorted(old_keys)
    other = _decoder()
    other.load_state_dict(m.state_dict(), strict=True)
    assert other.banned_words.dtype == torch.bool and int(other.banned_words.sum()) == 3
    assert m.to(torch.float64).banned_words.dtype == torch.bool  # a dtype cast leaves the mask a mask


# --- n-gram blocking on the device ------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_blocking_on_the_device_matches_the_numpy_loop(n):
    from stage2_decoder.decoding.ngram_block import block_repeats

    rng = np.random.default_rng(n)
    for t in range(0, 12):
        seqs = rng.integers(0, 6, (3, 4, t))  # 6 words: many repeats
        logp = rng.normal(size=(3, 4, 9)).astype(np.float32)
        want = logp.copy()
        block_repeats(want, seqs, n)  # the numpy path (the ONNX decoder's)
        got = torch.from_numpy(logp.copy())
        block_repeats(got, torch.from_numpy(seqs), n)
        np.testing.assert_array_equal(got.numpy(), want)  # -inf written or not: no arithmetic to round
    assert np.isinf(want).any()


def test_ngram_blocking_reads_nothing_back_from_the_device():
    from stage2_decoder.decoding.ngram_block import block_repeats

    seqs = torch.randint(0, 5, (4, 3, 10))
    logp = torch.randn(4, 3, 20)
    with HostReads() as mode:
        block_repeats(logp, seqs, 2)
    assert mode.n == 0
    assert torch.isinf(logp).any()


def test_beam_search_with_ngram_blocking_reads_back_a_fixed_few_times(gpu_cadence):
    from stage2_decoder.decoding.beam import DONE_CHECK_EVERY, beam_search_nbest
    from stage2_decoder.decoding.config import DecodeConfig

    m = _decoder().eval()
    with HostReads() as mode:
        beam_search_nbest(m, torch.randn(16, 32), DecodeConfig(beam_size=3, max_len=20, no_repeat_ngram=2))
    assert mode.n <= 20 // DONE_CHECK_EVERY + 6, mode.n  # was one read per step for the n-gram check alone


# --- SCST sampling -----------------------------------------------------------------------------------------

def _old_sample(model, features, k, max_len):
    """3ddb13e's SCST sampling loop: it asked the device "any caption alive?" after every step."""
    from stage2_decoder.decoding.beam import END_ID, START_ID

    h, c = model.init_state(features)
    state = (h.repeat_interleave(k, dim=1), c.repeat_interleave(k, dim=1))
    n = features.shape[0] * k
    tokens = torch.full((n,), START_ID, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    ids, logps, masks = [], [], []
    for _ in range(max_len):
        logp, state = model.step(tokens, state)
        tokens = torch.multinomial(logp.detach().exp(), 1).squeeze(1)
        masks.append(alive.clone())
        logps.append(logp.gather(1, tokens[:, None]).squeeze(1))
        ids.append(torch.where(alive, tokens, torch.zeros_like(tokens)))
        alive &= tokens != END_ID
        if not bool(alive.any()):
            break
    return torch.stack(ids, 1), torch.stack(logps, 1), torch.stack(masks, 1).float()


@pytest.mark.parametrize("cadence", ["gpu", "cpu", "lagged"])
@pytest.mark.parametrize("end_bias, max_len", [(4.0, 16), (2.0, 16), (-9.0, 16), (4.0, 7), (1.0, 5), (3.0, 2)])
def test_scst_sampling_draws_as_before_and_leaves_the_generator_as_before(end_bias, max_len, cadence, request):
    """The same computation as 3ddb13e's loop (the same ops on the same draws), so the same bits; and the
    generator ends where the old loop left it, so the next batch draws the same too. "lagged": each check
    point read at the next, as on a GPU: the loop runs past the last <end>, then drops those steps."""
    from stage2_decoder.decoding.beam import END_ID
    from stage2_decoder.training.scst import sample, scst_mode

    if cadence != "cpu":
        request.getfixturevalue("gpu_cadence" if cadence == "gpu" else "lagged")
    m = _decoder()
    m.out_bias.data[END_ID] = end_bias  # captions end early, late or never
    feats = torch.randn(6, 32)
    with scst_mode(m):
        torch.manual_seed(7)
        got = sample(m, feats, 5, max_len)
        after_new = torch.get_rng_state()
        torch.manual_seed(7)
        want = _old_sample(m, feats, 5, max_len)
        after_old = torch.get_rng_state()
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a, b)
    assert torch.equal(after_new, after_old)


def test_scst_sampling_reads_the_device_every_few_steps_not_every_step(gpu_cadence):
    from stage2_decoder.decoding.beam import DONE_CHECK_EVERY, END_ID
    from stage2_decoder.training.scst import sample, scst_mode

    m = _decoder()
    m.out_bias.data[END_ID] = -9.0  # no caption ends: all 16 steps run
    with scst_mode(m), HostReads() as mode:
        ids, _, _ = sample(m, torch.randn(4, 32), 5, 16)
    assert ids.shape[1] == 16
    assert mode.n <= 16 // DONE_CHECK_EVERY, mode.n  # 3ddb13e: 16 (one `bool(alive.any())` per step)


def test_scst_sampling_from_nan_weights_is_a_floating_point_error_not_a_multinomial_failure():
    """On CUDA, torch.multinomial on NaN probabilities is a device-side assert that kills the CUDA context."""
    from stage2_decoder.training.scst import sample, scst_mode

    m = _decoder()
    m.out_proj.weight.data[0, 0] = float("nan")
    with scst_mode(m), pytest.raises(FloatingPointError, match="not finite at step 1"):
        sample(m, torch.randn(3, 32), 5, 16)


# --- greedy and sampled captions (validation at --val-beam-size 1, caption, the service) ---------------------

@pytest.mark.parametrize("how", ["greedy", "sample"])
def test_word_by_word_decoding_reads_the_device_every_few_steps_not_every_step(how, gpu_cadence):
    from stage2_decoder.decoding.beam import DONE_CHECK_EVERY, END_ID
    from stage2_decoder.decoding.sampling import greedy_scored, sample_captions

    m = _decoder().eval()
    m.out_bias.data[END_ID] = -9.0  # no caption ends: all 20 steps run
    feats = torch.randn(8, 32)
    with HostReads() as mode:
        if how == "greedy":
            greedy_scored(m, feats, max_len=20)
        else:
            sample_captions(m, feats, 3, max_len=20, seed=1, keys=list(range(8)))
    # the periodic "all ended?", the ids and the scores at the end (and sampling's finiteness flag)
    assert mode.n <= 20 // DONE_CHECK_EVERY + 3, mode.reads  # 6a73d6a: one `bool(alive.any())` per step


def test_sampled_captions_end_where_they_did_when_every_step_was_checked(monkeypatch):
    """Checking "all ended?" every few steps (a GPU) only adds steps past the last <end>: the same captions and
    scores as checking every step (the CPU)."""
    from stage2_decoder.decoding import beam, sampling
    from stage2_decoder.decoding.beam import END_ID
    from stage2_decoder.decoding.config import DecodeConfig

    m = _decoder().eval()
    m.out_bias.data[END_ID] = 2.5  # captions end at many different steps, all before max_len
    feats = torch.randn(6, 32)
    runs = {}
    for every in (1, beam.DONE_CHECK_EVERY):
        for mod in (beam, sampling):
            monkeypatch.setattr(mod, "done_check_every", lambda device, every=every: every)
        runs[every] = (sampling.sample_captions(m, feats, 4, max_len=30, seed=7, keys=list(range(6))),
                       sampling.greedy_scored(m, feats, max_len=30), beam.greedy(m, feats, max_len=30),
                       beam.beam_search_nbest(m, feats, DecodeConfig(beam_size=3, max_len=30)))
    assert runs[1] == runs[beam.DONE_CHECK_EVERY]
    assert any(len(ids) < 29 for hyps in runs[1][0] for ids, _ in hyps)


@pytest.mark.parametrize("how", ["greedy", "greedy_scored", "sample", "beam", "scst"])
def test_on_the_cpu_decoding_stops_at_the_step_the_last_caption_ended(how):
    """A host read costs nothing on the CPU: no step past the last <end> (checking every 4 steps ran up to 3
    more, 5-20% of the decoding)."""
    from stage2_decoder.decoding.beam import END_ID, beam_search_nbest, greedy
    from stage2_decoder.decoding.config import DecodeConfig
    from stage2_decoder.decoding.sampling import greedy_scored, sample_captions
    from stage2_decoder.training.scst import sample, scst_mode

    m = _decoder().eval()
    m.out_bias.data[END_ID] = 3.0  # captions end after a few words
    feats = torch.randn(6, 32)
    steps = []
    real_step = m.step
    m.step = lambda tokens, state: (steps.append(tokens.shape[0]), real_step(tokens, state))[1]
    if how == "greedy":
        lengths = [len(ids) for ids in greedy(m, feats, max_len=30)]
    elif how == "greedy_scored":
        lengths = [len(hyps[0][0]) for hyps in greedy_scored(m, feats, max_len=30)]
    elif how == "sample":
        lengths = [len(ids) for hyps in sample_captions(m, feats, 3, max_len=30, seed=3, keys=list(range(6)))
                   for ids, _ in hyps]
    elif how == "beam":
        # beam search ends an image once its beam_size hypotheses have: the longest of them is the last step
        lengths = [max(len(ids) for ids, _ in hyps)
                   for hyps in beam_search_nbest(m, feats, DecodeConfig(beam_size=3, max_len=30))]
    else:
        with scst_mode(m):
            ids, _, mask = sample(m, feats, 3, 30)
        lengths = [int(n) - 1 for n in mask.sum(1)]  # the words before each <end>
    assert max(lengths) < 29  # every caption ended before max_len
    assert len(steps) == max(lengths) + 1, (len(steps), max(lengths))  # the words, then the last <end>


def test_sampling_from_nan_weights_is_a_floating_point_error_not_a_multinomial_failure():
    """On CUDA, torch.multinomial on NaN probabilities is a device-side assert that kills the CUDA context: in
    `serve`, every later request would fail."""
    from stage2_decoder.decoding.sampling import sample_captions

    m = _decoder().eval()
    m.out_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        sample_captions(m, torch.randn(3, 32), 2, max_len=10, seed=0, keys=[0, 1, 2])


def test_sampling_draws_the_batch_at_once_what_multinomial_draws_per_image():
    """A torch.multinomial call per image and step was ~13 kernel launches per image on CUDA: with 32 images,
    ~450 launches a step against greedy's ~24. The batch is now drawn at once, each image from its own generator,
    with the draws multinomial made."""
    from torch.profiler import ProfilerActivity, profile

    from stage2_decoder.decoding.beam import END_ID
    from stage2_decoder.decoding.sampling import draw_rows, sample_captions

    g = torch.Generator().manual_seed(0)
    for v, n in ((7, 1), (50, 3), (3000, 5)):  # numels either side of the CPU's vectorised exponential path
        probs = torch.softmax(3 * torch.randn(4 * n, v, generator=g), -1)
        probs[0, :] = 0.0
        probs[0, 2] = 1.0  # a certain word
        seeds = [11, 12, 13, 14]
        want = torch.cat([torch.multinomial(p, 1, generator=torch.Generator().manual_seed(s)).squeeze(1)
                          for p, s in zip(probs.split(n), seeds)])
        got = draw_rows(probs, n, [torch.Generator().manual_seed(s) for s in seeds])
        assert torch.equal(got, want) and got[0] == 2

    m = _decoder().eval()
    m.out_bias.data[END_ID] = -9.0  # no caption ends: all 8 steps run

    def ops(b: int) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as p:
            sample_captions(m, torch.randn(b, 32), 2, max_len=8, seed=0, keys=list(range(b)))
        return sum(e.name.startswith("aten::") for e in p.events())

    per_image_step = (ops(16) - ops(8)) / 8 / 8
    assert per_image_step <= 8, per_image_step  # its noise draw and a view of it; 43 with multinomial per image


def test_a_diverged_decoder_in_the_scst_cli_is_one_error_line(shared_cache, tmp_path):
    """NaN weights reaching SCST: one `error:` line and exit 1 from the train CLI, no traceback."""
    from click.testing import CliRunner

    import stage2_decoder.training.scst as scst_mod
    from stage2_decoder.train import main

    real = scst_mod.sample

    def poisoned(model, features, k, max_len):
        with torch.no_grad():
            model.out_proj.weight[0, 0] = float("nan")
        return real(model, features, k, max_len)

    scst_mod.sample = poisoned
    try:
        r = CliRunner().invoke(main, ["--features", str(shared_cache), "--out", str(tmp_path / "run"), "--epochs", "1",
                                      "--scst-epochs", "1", "--batch-size", "16", "--embed-size", "16",
                                      "--hidden-size", "32", "--vocab-threshold", "2", "--device", "cpu",
                                      "--no-progress", "--dry-run"])
    finally:
        scst_mod.sample = real
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not finite" in errors[0] and "Traceback" not in r.output


# --- best.pt without the CUDA generators -----------------------------------------------------------------

def test_best_pt_leaves_the_cuda_generators_to_last_pt(shared_cache, tmp_path, monkeypatch):
    """Faked CUDA generators (no GPU here), as a CUDA run would save them."""
    import stage2_decoder.train as train_mod
    import stage2_decoder.training.run_files as run_files_mod
    from stage2_decoder.training.checkpoint import load_checkpoint

    fake = {"cuda_rng_state": [torch.arange(16, dtype=torch.uint8)]}
    monkeypatch.setattr(run_files_mod, "cuda_rng_state", lambda device: fake)
    train_mod.train(train_mod.TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), epochs=1,
                                          scst_epochs=0, batch_size=16, embed_size=16, hidden_size=32,
                                          vocab_threshold=2, dry_run=True, device="cpu", progress=False))
    assert "cuda_rng_state" in load_checkpoint(tmp_path / "run" / "last.pt")
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert "cuda_rng_state" not in best and "rng_state" not in best


# --- stage 1: workers, the frozen CNN cast once ------------------------------------------------------------

def test_stage1_workers_leave_the_main_process_a_core(monkeypatch):
    from common.backbones import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers() == 7  # 8 cores per rank, one for each rank's main process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_workers() == 1  # never none: 0 would decode in the main process


def test_batchnorm_is_folded_on_every_device_and_keeps_the_features(monkeypatch):
    """The CPU encoder runs the folded network too (1.3-1.7x faster for mobilenet_v2): no BatchNorm left,
    and features equal to the unfolded network's up to fp32 rounding."""
    import common.backbones as bb_mod

    bb = bb_mod.load_backbone("mobilenet_v2", "none", "cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.model.modules())
    monkeypatch.setattr(bb_mod, "fold_batchnorm", lambda model: model)
    plain = bb_mod.load_backbone("mobilenet_v2", "none", "cpu")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.model.modules())
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    a, b = plain.encode(x), bb.encode(x)
    # fp32 rounding of the folded weights through ~50 layers: ~1e-6 of the features' scale
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4 * float(a.abs().max()))


def test_a_bf16_backbone_casts_its_weights_once_and_runs_without_autocast(monkeypatch):
    """What CUDA gets (precision bfloat16), forced on the CPU: bf16 weights from the start, no autocast per
    forward, features close to the fp32 ones."""
    import common.backbones as bb_mod

    fp32 = bb_mod.load_backbone("mobilenet_v2", "none", "cpu")
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    want = fp32.encode(x)
    monkeypatch.setattr(bb_mod.Backbone, "precision", property(lambda self: "bfloat16"))
    autocasts = []
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda *a, **kw: (autocasts.append(a), real(*a, **kw))[1])
    bf16 = bb_mod.load_backbone("mobilenet_v2", "none", "cpu")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    got = bf16.encode(x)
    assert autocasts == [] and got.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: the features agree in direction, not in their last digits
    assert float(torch.nn.functional.cosine_similarity(got, want).min()) > 0.99


# --- bench/gpu.py: a part that fails makes the check fail ---------------------------------------------------

def _gpu_bench(monkeypatch):
    import sys

    from conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    sys.modules.pop("gpu", None)
    import gpu

    return gpu


@pytest.mark.parametrize("how, status", [("raise", "error"), ("fail", "failed"), ("hang", "timeout")])
def test_a_part_that_fails_or_hangs_is_reported_and_the_check_exits_non_zero(how, status, data_dir, tmp_path,
                                                                             monkeypatch):
    import json
    import time

    gpu = _gpu_bench(monkeypatch)

    def broken(ctx):
        if how == "raise":
            raise RuntimeError("CUDA error: device-side assert triggered")
        if how == "hang":
            time.sleep(30)
        return {"ok": 0, "_failed": True}

    monkeypatch.setitem(gpu.RUNNERS, "jpegs", broken)
    monkeypatch.setitem(gpu.RUNNERS, "stage2", lambda ctx: {"xe_epoch_s": 1.0})
    rc = gpu.main(["--device", "cpu", "--tiny", "--data", str(data_dir), "--work", str(tmp_path),
                   "--parts", "jpegs,stage1,stage2", "--limit", "jpegs=1"])
    assert rc == 1
    lines = [json.loads(x) for x in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert [(x["part"], x["status"]) for x in lines[::2]] == [("jpegs", status), ("stage2", "ok")]
    # what needed it: skipped, or (after a part that failed a check but ran) an error of its own
    assert lines[1]["part"] == "stage1" and lines[1]["status"] == ("error" if how == "fail" else "skipped")
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["parts"]["jpegs"] == status and doc["stage2"]["xe_epoch_s"] == 1.0
    assert any(n.startswith(f"jpegs: {status}") for n in doc["notes"])


def test_a_sweep_whose_runs_all_fail_fails_the_check(monkeypatch, tmp_path):
    """The real sweep CLI in its own process, over a cache that is no cache: no run finishes."""
    from types import SimpleNamespace

    gpu = _gpu_bench(monkeypatch)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an HDF5 file")
    ctx = SimpleNamespace(args=SimpleNamespace(tiny=True), device=torch.device("cpu"), work=tmp_path, cache=bad,
                          limits={})
    r = gpu.part_sweep(ctx)
    assert r["ok"] == 0 and r["failed"] == r["runs"] == 2 and r["rc"] != 0 and r["_failed"] is True


# --- check points read a check point late (a GPU's LaggedFlags), emulated on the CPU -------------------------

@pytest.fixture
def lagged(monkeypatch):
    """The decoding loops as on a GPU: check points every DONE_CHECK_EVERY steps, each one's flags read at the
    next (readback.LaggedFlags with lag 1; host copies instead of pinned memory and CUDA events), and results
    read back packed into one copy."""
    import functools

    from stage2_decoder.decoding import beam, readback, sampling
    from stage2_decoder.training import scst

    for mod in (beam, sampling, scst):
        monkeypatch.setattr(mod, "done_check_every", lambda device: beam.DONE_CHECK_EVERY)
        monkeypatch.setattr(mod, "LaggedFlags", functools.partial(readback.LaggedFlags, lag=1))
        monkeypatch.setattr(mod, "read_back", functools.partial(readback.read_back, pack=True), raising=False)


def _all_decodings(m, feats, max_len=30):
    from stage2_decoder.decoding import beam, sampling
    from stage2_decoder.decoding.config import DecodeConfig

    return (sampling.sample_captions(m, feats, 4, max_len=max_len, seed=7, keys=list(range(len(feats)))),
            sampling.greedy_scored(m, feats, max_len=max_len), beam.greedy(m, feats, max_len=max_len),
            beam.beam_search_nbest(m, feats, DecodeConfig(beam_size=3, max_len=max_len)),
            beam.beam_search_nbest(m, feats, DecodeConfig(beam_size=2, max_len=max_len, no_repeat_ngram=2)))


@pytest.mark.parametrize("end_bias, max_len", [(2.5, 30), (4.0, 9), (-9.0, 12), (1.0, 5)])
def test_decoding_that_learns_of_the_end_a_check_point_late_gives_the_same_captions(end_bias, max_len, request):
    from stage2_decoder.decoding.beam import END_ID

    m = _decoder().eval()
    m.out_bias.data[END_ID] = end_bias  # captions end early, late or never
    feats = torch.randn(6, 32)
    want = _all_decodings(m, feats, max_len)
    request.getfixturevalue("lagged")
    assert _all_decodings(m, feats, max_len) == want


def test_scst_sampling_read_late_still_stops_on_nan_weights(lagged):
    from stage2_decoder.training.scst import sample, scst_mode

    m = _decoder()
    m.out_proj.weight.data[0, 0] = float("nan")
    with scst_mode(m), pytest.raises(FloatingPointError, match="not finite at step 1"):
        sample(m, torch.randn(3, 32), 5, 16)


@pytest.mark.parametrize("how", ["beam", "greedy", "greedy_scored", "sample", "scst"])
def test_decoding_loops_read_the_device_only_through_the_lagged_flags_and_one_read_back(how, lagged):
    """On a GPU every other read would be a sync: the loops read the device only through LaggedFlags (a copy
    a check point old, no stall) and read_back (the results, in one copy)."""
    from stage2_decoder.decoding.beam import END_ID, beam_search_nbest, greedy
    from stage2_decoder.decoding.config import DecodeConfig
    from stage2_decoder.decoding.sampling import greedy_scored, sample_captions
    from stage2_decoder.training.scst import sample, scst_mode

    m = _decoder().eval()
    m.out_bias.data[END_ID] = 2.0
    feats = torch.randn(8, 32)
    with HostReads() as mode:
        if how == "beam":
            beam_search_nbest(m, feats, DecodeConfig(beam_size=3, max_len=20, no_repeat_ngram=2))
        elif how == "greedy":
            greedy(m, feats, max_len=20)
        elif how == "greedy_scored":
            greedy_scored(m, feats, max_len=20)
        elif how == "sample":
            sample_captions(m, feats, 3, max_len=20, seed=1, keys=list(range(8)))
        else:
            with scst_mode(m):
                sample(m, feats, 5, 20)
    assert set(mode.callers) <= {"_pop", "read_back"}, mode.callers
    copies = [name for caller, name in zip(mode.callers, mode.reads) if caller == "read_back" and name != "tolist"]
    assert copies == ([] if how == "scst" else ["cpu"])  # the results' one copy (the tolists split it on the host)
    assert 0 < mode.callers.count("_pop") <= 20 // 2


def test_read_back_packs_the_tensors_into_one_copy_and_returns_what_tolist_does():
    from stage2_decoder.decoding.readback import read_back

    g = torch.Generator().manual_seed(0)
    tensors = (torch.randn(3, 4, generator=g), torch.randint(-5, 2**40, (2, 5), generator=g),
               torch.randn(4, dtype=torch.float64, generator=g), torch.rand(3, generator=g) > 0.5,
               torch.tensor(7), torch.tensor([float("-inf"), float("nan")]), torch.zeros(0, 3, dtype=torch.long))
    want = [t.tolist() for t in tensors]
    got = read_back(*tensors, pack=True)
    assert repr(got) == repr(want)  # nan == nan as text; the types too (float, int, bool)
    with HostReads() as mode:
        read_back(*tensors, pack=True)
    assert mode.reads.count("cpu") == 1 and "item" not in mode.reads


def test_draw_one_draws_what_multinomial_draws():
    from stage2_decoder.decoding.sampling import draw_one

    g = torch.Generator().manual_seed(0)
    for v in (7, 50, 3000):
        probs = torch.softmax(3 * torch.randn(40, v, generator=g), -1)
        probs[0] = 0.0
        probs[0, 2] = 1.0
        for seed in range(5):
            want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
            got = draw_one(probs, torch.Generator().manual_seed(seed))
            assert torch.equal(got, want) and got[0] == 2


def _ends_then_nan(m, module, monkeypatch, end_step: int) -> list:
    """`m` ends every caption at `end_step`, and `module`'s next-word probabilities are NaN from the step after
    it (its `drawable` says so); returns the list that counts the steps drawn."""
    from stage2_decoder.decoding import sampling
    from stage2_decoder.decoding.beam import END_ID

    m.out_bias.data[:] = -30.0
    m.out_bias.data[END_ID] = 30.0
    steps = []
    real = sampling.drawable

    def nan_after_the_end(probs):
        steps.append(1)
        return (real(probs)[0], torch.tensor(len(steps) <= end_step))

    monkeypatch.setattr(module, "drawable", nan_after_the_end)
    return steps


def test_scst_read_late_raises_only_for_the_steps_a_per_step_loop_took(lagged, monkeypatch):
    """Every caption ends at a check point's first step and the next step's probabilities are NaN: a per-step
    loop stopped before that step, so the late read must not call it an error."""
    from stage2_decoder.training import scst
    from stage2_decoder.training.scst import sample, scst_mode

    m = _decoder()
    steps = _ends_then_nan(m, scst, monkeypatch, end_step=1)
    with scst_mode(m):
        ids, _, mask = sample(m, torch.randn(3, 32), 2, 9)
    assert ids.shape[1] == 1 and len(steps) >= 2  # the lagged loop ran step 2 and did not raise


def test_sampled_captions_read_late_raise_only_for_steps_a_per_step_loop_took(lagged, monkeypatch):
    from stage2_decoder.decoding import sampling
    from stage2_decoder.decoding.beam import END_ID

    m = _decoder().eval()
    steps = _ends_then_nan(m, sampling, monkeypatch, end_step=2)  # min_len 1: the end comes at step 2
    got = sampling.sample_captions(m, torch.randn(3, 32), 2, max_len=9, seed=0, keys=[0, 1, 2])
    assert len(steps) >= 3 and all(len(ids) == 1 for hyps in got for ids, _ in hyps)
    steps.clear()
    m.out_bias.data[END_ID] = -30.0  # no caption ends: step 3's NaN is one a per-step loop meets too
    with pytest.raises(FloatingPointError):
        sampling.sample_captions(m, torch.randn(3, 32), 2, max_len=9, seed=0, keys=[0, 1, 2])
