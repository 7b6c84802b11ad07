"""CPU guards for the CUDA path: each checks, on the CPU, a property that a GPU run depends on
(cuDNN's training-mode RNN backward, fp32 LSTM under autocast, a step without host syncs, ...)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from host_reads import HostReads
from stage2_decoder.model import CaptionDecoder, DecoderConfig

TINY_CLI = ["--batch-size", "16", "--embed-size", "16", "--hidden-size", "32", "--vocab-threshold", "2",
            "--device", "cpu", "--no-progress", "--dry-run"]


def _decoder(**kw) -> CaptionDecoder:
    torch.manual_seed(0)
    return CaptionDecoder(DecoderConfig(**{**dict(feature_dim=32, vocab_size=40, embed_size=16, hidden_size=24,
                                                  num_layers=2, dropout=0.5, tie_embeddings=True), **kw}))


def test_no_gradient_flows_through_an_lstm_in_eval_mode_during_training_with_scst(shared_cache, tmp_path):
    """cuDNN refuses RNN backward in eval mode: every grad-enabled LSTM forward of a run (cross-entropy
    and SCST, through the real train CLI) must find the LSTM in training mode."""
    from stage2_decoder.train import main

    bad, grad_forwards = [], []

    def check(module, args):
        if isinstance(module, nn.LSTM) and torch.is_grad_enabled():
            grad_forwards.append(module.training)
            if not module.training:
                bad.append(module)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
    try:
        r = CliRunner().invoke(main, ["--features", str(shared_cache), "--out", str(tmp_path / "run"),
                                      "--epochs", "1", "--scst-epochs", "1", *TINY_CLI], catch_exceptions=False)
    finally:
        handle.remove()
    assert r.exit_code == 0, r.output
    assert grad_forwards, "no gradient-enabled LSTM forward seen: the hook did not run"
    assert not bad, f"{len(bad)} of {len(grad_forwards)} grad-enabled LSTM forwards in eval mode"


def test_scst_mode_freezes_batchnorm_and_switches_every_dropout_off():
    from stage2_decoder.training.scst import scst_mode

    m = _decoder()
    before = m.bn.running_mean.clone()
    with scst_mode(m):
        assert m.lstm.training and not m.bn.training and not m.drop.training and m.lstm.dropout == 0.0
        feats = torch.randn(6, 32)
        state = m.init_state(feats)
        a, _ = m.step(torch.ones(6, dtype=torch.long), state)
        b, _ = m.step(torch.ones(6, dtype=torch.long), state)
        assert torch.equal(a, b)  # no dropout anywhere
        a.sum().backward()
    assert torch.equal(m.bn.running_mean, before)
    assert m.lstm.dropout == 0.5  # restored for the next cross-entropy epoch


def test_the_lstm_runs_in_fp32_with_autocast_off_while_the_projections_stay_under_autocast():
    """On CUDA, autocast runs cuDNN's LSTM in fp16 (no loss scaling); CPU autocast stands in for it here."""
    m = _decoder()
    seen = []
    m.lstm.register_forward_pre_hook(
        lambda mod, args: seen.append((args[0].dtype, [s.dtype for s in (args[1] if len(args) > 1 and args[1] is not None else ())],
                                       torch.is_autocast_enabled("cpu"))))
    feats, inputs, lengths = torch.randn(4, 32), torch.randint(3, 40, (4, 7)), torch.tensor([7, 6, 5, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(feats, inputs, lengths)
        m.step(torch.ones(4, dtype=torch.long), m.init_state(feats))
    assert len(seen) == 3  # forward, init_state, step
    for x_dtype, state_dtypes, autocast_on in seen:
        assert x_dtype == torch.float32 and all(d == torch.float32 for d in state_dtypes)
        assert not autocast_on
    assert logits.dtype == torch.bfloat16  # the vocabulary projection keeps its autocast speed-up


# --- the sync-free step: same losses and weights as f959e73's step --------------------------------------------

def _old_gather(pairs, idx, features, generator):
    """f959e73's CaptionPairs.gather: rows in idx's order (packing sorted them on the device)."""
    from stage2_decoder.training.pairs import CaptionBatch, view_rows

    lengths = pairs.lengths[idx]
    t = int(lengths.max())
    return CaptionBatch(view_rows(features, pairs.rows[idx], generator), pairs.inputs[idx, :t],
                        pairs.targets[idx, :t], lengths)


def _old_batch_loss(model, b):
    """f959e73's forward + loss: pack_padded_sequence(enforce_sorted=False), which sorts (and uploads its
    indices) on every call."""
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pack_padded_sequence

    img = model.image_embedding(b.features).unsqueeze(1)
    emb = model.drop(model.embed(b.inputs))
    hidden, _ = model.lstm(torch.cat([img, emb], 1))
    words = pack_padded_sequence(hidden[:, 1:], b.lengths.cpu(), batch_first=True, enforce_sorted=False).data
    logits = model.logits(model.drop(words))
    targets = pack_padded_sequence(b.targets, b.lengths, batch_first=True, enforce_sorted=False).data
    return F.cross_entropy(logits.float(), targets), int(b.lengths.sum())


def _train_pairs(shared_cache):
    from common.feature_cache import load_cache
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.data import prepare_data
    from stage2_decoder.training.pairs import CaptionPairs

    cfg = TrainConfig(features=str(shared_cache), out="unused", vocab_threshold=2, embed_size=16, hidden_size=32,
                      batch_size=16, dropout=0.0, device="cpu", progress=False)
    cache = load_cache(cfg.features, views=True)
    parts, _, vocab, rows, tokens = prepare_data(cfg, cache)
    pairs = CaptionPairs(parts["train"], rows, vocab, cfg.max_caption_len, tokens)
    views = torch.cat([torch.from_numpy(cache.features)[None], torch.from_numpy(cache.views).transpose(0, 1)]) \
        if cache.views is not None else torch.from_numpy(cache.features).float()
    return cfg, pairs, views.float(), len(vocab), cache.meta.feature_dim


NOISE = ("project.bias", "bn.running_mean")


def test_the_sync_free_step_trains_exactly_as_before(shared_cache):
    """Twelve steps of train()'s own step + EMA (without warm-up: AveragedModel has none) against f959e73's
    (unsorted batches, enforce_sorted=False, AveragedModel): the same losses to float32 rounding, with
    BatchNorm training (dropout off: its masks follow the rows, and the rows now come in another order)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from stage2_decoder.training.ema import EMA
    from stage2_decoder.training.epochs import train_step

    cfg, pairs, feats, vocab_size, dim = _train_pairs(shared_cache)
    torch.manual_seed(0)
    new = CaptionDecoder(cfg.decoder_config(dim, vocab_size)).train()
    old = CaptionDecoder(cfg.decoder_config(dim, vocab_size)).train()
    old.load_state_dict(new.state_dict())
    opt_new, opt_old = (torch.optim.Adam(m.parameters(), lr=3e-3) for m in (new, old))
    ema_new = EMA(new, 0.9, warmup=False)
    ema_old = AveragedModel(old, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    batches = [i for i in pairs.batches(cfg.batch_size, torch.Generator().manual_seed(0), 4) if len(i) > 1][:12]
    g_new, g_old = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for idx in batches:
        b = pairs.gather(idx, feats, g_new)
        loss_new, n_new = train_step(new, opt_new, b, "cpu", cfg.grad_clip)
        ema_new.update(new)
        ob = _old_gather(pairs, idx, feats, g_old)
        loss_old, n_old = _old_batch_loss(old, ob)
        opt_old.zero_grad(set_to_none=True)
        loss_old.backward()
        torch.nn.utils.clip_grad_norm_(old.parameters(), cfg.grad_clip)
        opt_old.step()
        ema_old.update_parameters(old)
        assert n_new == n_old
        # the two sum the same token losses in other orders, over weights that agree to ~1e-6 (below): float32
        # rounding of a mean of ~1e3 terms, a few ulps (bit-equality held on some CPUs' kernels, not others)
        torch.testing.assert_close(loss_new, loss_old.detach(), rtol=1e-5, atol=0)
    assert any(not torch.equal(pairs.lengths[i], pairs.lengths[i].sort(descending=True).values)
               for i in batches)  # the old step did get unsorted batches
    # the weights agree to rounding only: the embedding's backward adds its rows' gradients in the rows' order,
    # which shifts the clipping norm in its last bits
    # (project.bias, and the BatchNorm mean that tracks it, are left out: BatchNorm subtracts the batch mean, so
    # that bias's gradient is rounding noise, which Adam's normalised step follows)
    for (k, a), (_, c) in zip(new.state_dict().items(), old.state_dict().items()):
        if k not in NOISE:
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=k)
    for (k, a), (_, c) in zip(ema_new.module.state_dict().items(), ema_old.module.state_dict().items()):
        if a.is_floating_point() and k not in NOISE:
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=k)


def test_validation_batches_give_the_same_loss_as_before(shared_cache):
    """evaluate_loss's batches (ascending lengths, eval mode) in f959e73's loss and in today's."""
    from stage2_decoder.training.epochs import batch_loss

    cfg, pairs, feats, vocab_size, dim = _train_pairs(shared_cache)
    torch.manual_seed(0)
    model = CaptionDecoder(cfg.decoder_config(dim, vocab_size)).eval()
    centre = feats[0] if feats.dim() == 3 else feats  # (N, D)
    idx = torch.argsort(pairs.lengths, stable=True)
    with torch.no_grad():
        for s in range(0, len(idx), 64):
            loss, n = batch_loss(model, pairs.gather(idx[s:s + 64], centre), "cpu")
            want, m = _old_batch_loss(model, _old_gather(pairs, idx[s:s + 64], centre, None))
            assert n == m and torch.equal(loss, want)


def test_the_step_packs_without_sorting_on_the_device_and_the_average_reads_nothing_back(shared_cache, monkeypatch):
    """enforce_sorted=False sorts and uploads its indices (a host sync per call on CUDA); AveragedModel reads
    its update count back (`n_averaged == 0`) every step."""
    import torch.nn.utils.rnn as rnn

    import stage2_decoder.model as model_mod
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    sorted_flags = []
    real = rnn.pack_padded_sequence

    def spy(*a, **kw):
        sorted_flags.append(kw.get("enforce_sorted", True))
        return real(*a, **kw)

    monkeypatch.setattr(rnn, "pack_padded_sequence", spy)
    monkeypatch.setattr(model_mod, "pack_padded_sequence", spy)

    import stage2_decoder.training.loop as loop_mod

    averages = []
    real_xe = loop_mod.xe_epoch

    def xe(model, opt, train_set, features, device, cfg, epoch, steps, ema=None):
        averages.append(ema)
        return real_xe(model, opt, train_set, features, device, cfg, epoch, steps, ema)

    monkeypatch.setattr(loop_mod, "xe_epoch", xe)
    train(TrainConfig(features=str(shared_cache), out=str(shared_cache.parent / "sync-free-run"), epochs=1,
                      scst_epochs=0, batch_size=16, embed_size=16, hidden_size=32, vocab_threshold=2, dry_run=True,
                      device="cpu", progress=False))
    assert sorted_flags and all(sorted_flags)
    ema = averages[0]
    model = CaptionDecoder(ema.module.cfg)
    with HostReads() as mode:
        for _ in range(3):
            (ema.update if hasattr(ema, "update") else ema.update_parameters)(model)
    assert not mode.reads, mode.reads


# --- beam search: finished hypotheses on the device, the same captions and scores as f959e73's ---------------

@torch.inference_mode()
def _old_beam_search_nbest(model, features, cfg):
    """f959e73's beam search, the reference: per-image Python bookkeeping, `.tolist()` per finished hypothesis."""
    from stage2_decoder.decoding.beam import END_ID, START_ID
    from stage2_decoder.decoding.ngram_block import block_repeats as _block_repeats

    b, k, dev = features.shape[0], cfg.beam_size, features.device
    h, c = model.init_state(features)
    state = (h.repeat_interleave(k, dim=1), c.repeat_interleave(k, dim=1))
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    tokens = torch.full((b * k,), START_ID, dtype=torch.long, device=dev)
    seqs = torch.zeros(b, k, 0, dtype=torch.long, device=dev)
    finished = [[] for _ in range(b)]
    done = [False] * b
    offsets = (torch.arange(b, device=dev) * k).unsqueeze(1)
    for t in range(cfg.max_len):
        logp, state = model.step(tokens, state)
        v = logp.shape[1]
        logp = logp.view(b, k, v)
        if t < cfg.min_len:
            logp[:, :, END_ID] = float("-inf")
        if cfg.no_repeat_ngram > 0 and t + 1 >= cfg.no_repeat_ngram:
            _block_repeats(logp, seqs, cfg.no_repeat_ngram)
        cand = (scores.unsqueeze(-1) + logp).view(b, k * v)
        top, idx = cand.topk(k, dim=1)
        beam, word = idx // v, idx % v
        seqs = torch.cat([seqs.gather(1, beam.unsqueeze(-1).expand(-1, -1, seqs.shape[2])), word.unsqueeze(-1)], 2)
        flat = (offsets + beam).view(-1)
        state = (state[0][:, flat], state[1][:, flat])
        scores = top.clone()
        ended = (word == END_ID) & torch.isfinite(top)
        if bool(ended.any()):
            for i, j in ended.nonzero().tolist():
                if not done[i]:
                    finished[i].append((seqs[i, j, :-1].tolist(), float(top[i, j]) / ((t + 1) ** cfg.length_penalty)))
            scores[ended] = float("-inf")
        for i in range(b):
            if not done[i] and (len(finished[i]) >= k or not bool(torch.isfinite(scores[i]).any())):
                done[i] = True
        if all(done):
            break
        for i in range(b):
            if done[i]:
                scores[i] = float("-inf")
        tokens = word.view(-1)
    out = []
    for i in range(b):
        hyps = finished[i]
        if len(hyps) < k:
            for j in range(k):
                if torch.isfinite(scores[i, j]):
                    hyps.append((seqs[i, j].tolist(), float(scores[i, j]) / (cfg.max_len ** cfg.length_penalty)))
        out.append(sorted(hyps, key=lambda h: -h[1])[:k] or [([], float("-inf"))])
    return out


@torch.inference_mode()
def _old_greedy(model, features, max_len=20, min_len=0):
    """f959e73's greedy decoding, the reference: it asked the device "all finished?" after every step."""
    from stage2_decoder.decoding.beam import END_ID, START_ID, until_end

    state = model.init_state(features)
    tokens = torch.full((features.shape[0],), START_ID, dtype=torch.long)
    out = torch.zeros(features.shape[0], max_len, dtype=torch.long)
    finished = torch.zeros(features.shape[0], dtype=torch.bool)
    for t in range(max_len):
        logp, state = model.step(tokens, state)
        if t < min_len:
            logp[:, END_ID] = float("-inf")
        tokens = logp.argmax(-1)
        out[:, t] = tokens
        finished |= tokens == END_ID
        if bool(finished.all()):
            break
    return [until_end(row) for row in out.tolist()]


BEAM_SETTINGS = [dict(beam_size=3), dict(beam_size=5, length_penalty=0.0), dict(beam_size=2, min_len=4),
                 dict(beam_size=3, max_len=6), dict(beam_size=1, length_penalty=1.0), dict(beam_size=4, max_len=12),
                 dict(beam_size=3, no_repeat_ngram=2)]


def _trained_decoder(cache, tmp_path, epochs: int, lr: float = 1e-3):
    from stage2_decoder.training.checkpoint import load_checkpoint
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    run = tmp_path / "beam-run"
    train(TrainConfig(features=str(cache), out=str(run), epochs=epochs, scst_epochs=0, batch_size=32, embed_size=32,
                      hidden_size=64, vocab_threshold=2, val_beam_size=1, val_images=20, lr=lr, device="cpu",
                      progress=False))
    ckpt = load_checkpoint(run / "best.pt")
    model = CaptionDecoder(DecoderConfig(**ckpt["decoder_config"]))
    model.load_state_dict(ckpt["model_state"])
    return model.eval()


def _assert_beams_as_before(model, feats):
    from stage2_decoder.decoding.beam import beam_search_nbest
    from stage2_decoder.decoding.config import DecodeConfig

    lengths = set()
    for how in BEAM_SETTINGS:
        cfg = DecodeConfig(**how)
        for s in range(0, len(feats), 100):
            got, want = beam_search_nbest(model, feats[s:s + 100], cfg), _old_beam_search_nbest(model, feats[s:s + 100], cfg)
            assert got == want, how  # the ids and the float scores, every hypothesis of every image
            lengths |= {len(ids) for hyps in got for ids, _ in hyps}
    assert len(lengths) > 3  # short and long captions: finished, filled and cut-off hypotheses all compared
    from stage2_decoder.decoding.beam import greedy

    for max_len, min_len in ((20, 0), (7, 1), (13, 3)):
        assert greedy(model, feats, max_len, min_len) == _old_greedy(model, feats, max_len, min_len)


def test_beam_search_gives_the_same_captions_and_scores_as_before(shared_cache, tmp_path):
    from common.feature_cache import load_cache

    model = _trained_decoder(shared_cache, tmp_path, epochs=12, lr=1e-2)
    _assert_beams_as_before(model, torch.from_numpy(load_cache(str(shared_cache)).features).float())


@pytest.mark.slow
def test_beam_search_as_before_on_300_cached_coco_images(coco_dir, tmp_path):
    from common.feature_cache import load_cache
    from stage1_extract.extract import ExtractConfig, extract

    out = tmp_path / "coco300.h5"
    extract(ExtractConfig(images=str(coco_dir / "images"), captions=str(coco_dir / "captions.json"), out=str(out),
                          backbone="mobilenet_v2", weights="default", batch_size=32, workers=0, device="cpu",
                          limit=300, progress=False))
    model = _trained_decoder(out, tmp_path, epochs=4)
    _assert_beams_as_before(model, torch.from_numpy(load_cache(str(out)).features).float())


def test_beam_search_reads_back_a_fixed_few_times_whatever_the_batch():
    """f959e73 read the device per step and per image (`bool(...)`, `.tolist()` per finished hypothesis)."""

    from stage2_decoder.decoding.beam import beam_search_nbest
    from stage2_decoder.decoding.config import DecodeConfig

    m = _decoder().eval()
    m.out_bias.data[2] = 3.0  # <end> likely: hypotheses finish at many different steps
    with HostReads() as mode:
        beam_search_nbest(m, torch.randn(64, 32), DecodeConfig(beam_size=3, max_len=20))
    assert mode.n <= 20 // 4 + 6, mode.reads  # the periodic "all done?" and the one transfer at the end


def test_checkpoints_keep_the_cuda_generators_and_a_resume_puts_them_back(shared_cache, tmp_path, monkeypatch):
    """Faked CUDA generators (no GPU here): what a run on CUDA saves in last.pt and restores on resume."""
    import stage2_decoder.train as train_mod
    import stage2_decoder.training.resume as resume_mod
    import stage2_decoder.training.run_files as run_files_mod
    from stage2_decoder.training.checkpoint import load_checkpoint

    fake = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: fake)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    saved = resume_mod.cuda_rng_state("cuda")
    assert resume_mod.cuda_rng_state("cpu") == {}
    monkeypatch.setattr(run_files_mod, "cuda_rng_state", lambda device: saved)  # the run itself is on the CPU
    cfg = dict(features=str(shared_cache), out=str(tmp_path / "run"), scst_epochs=0, batch_size=16, embed_size=16,
               hidden_size=32, vocab_threshold=2, dry_run=True, device="cpu", progress=False)
    train_mod.train(train_mod.TrainConfig(epochs=1, **cfg))
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert [torch.equal(a, b) for a, b in zip(ckpt["cuda_rng_state"], fake)] == [True, True]
    # one GPU now: its state, on device 0 (faked only here: during train() Adam would ask the "GPU" for a stream)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    resume_mod.restore_cuda_rng_state(ckpt, "cuda")
    assert len(restored) == 1 and torch.equal(restored[0][0], fake[0]) and restored[0][1] == 0
    resume_mod.restore_cuda_rng_state(ckpt, "cpu")
    assert len(restored) == 1  # a CPU resume leaves CUDA alone


def test_the_weight_average_recompacts_its_lstm_copy(shared_cache, tmp_path, monkeypatch):
    """A deep-copied LSTM's weights are no longer one contiguous cuDNN chunk (a warning and a re-compaction
    at every call on CUDA) until flatten_parameters() runs on the copy; on the CPU it is a no-op, so spy on it."""
    import stage2_decoder.train as train_mod
    import stage2_decoder.training.loop as loop_mod

    flattened, averages = [], []
    real = nn.LSTM.flatten_parameters
    monkeypatch.setattr(nn.LSTM, "flatten_parameters", lambda self: (flattened.append(self), real(self))[1])
    real_xe = loop_mod.xe_epoch
    monkeypatch.setattr(loop_mod, "xe_epoch", lambda *a, **kw: (averages.append(a[-1]), real_xe(*a, **kw))[1])
    train_mod.train(train_mod.TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), epochs=1,
                                          scst_epochs=0, batch_size=16, embed_size=16, hidden_size=32,
                                          vocab_threshold=2, dry_run=True, device="cpu", progress=False))
    assert averages[0] is not None
    assert any(m is averages[0].module.lstm for m in flattened)


# --- torchrun device mapping, stage 1 feeding the GPU, the precision in the cache identity --------------------

def test_torchrun_ranks_map_to_local_rank_modulo_the_visible_gpus(monkeypatch):
    import stage1_extract.distributed as dist_mod
    from stage1_extract.distributed import Dist, device_for

    monkeypatch.setattr(dist_mod, "resolve_device", lambda name: torch.device("cuda" if name == "auto" else name))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a launcher showing each process its own GPU
    assert device_for("auto", Dist(3, 4, 3)) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_for("cuda:0", Dist(1, 2, 1)) == torch.device("cuda", 1)  # not every rank on GPU 0
    assert device_for("cuda", Dist(2, 4, 2)) == torch.device("cuda", 0)
    assert device_for("cuda:1", Dist()) == torch.device("cuda", 1)  # without torchrun: as asked


def test_stage1_workers_default_to_the_cores_per_rank_less_the_main_process(monkeypatch):
    from common.backbones import default_workers

    from common.device import usable_cores

    cores = usable_cores()
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == max(1, cores - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    assert default_workers() == 1


@pytest.mark.parametrize("files, want", [
    ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2: 1.5 CPUs -> 2
    ({"cpu.max": "max 100000\n"}, None),  # no quota
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_the_cores_a_process_may_use_respect_a_containers_cpu_quota(tmp_path, monkeypatch, files, want):
    """Affinity shows a container every core of its host (a 16-core quota on a 200-core machine): stage 1
    would start a decoding worker per host core, each prefetching batches into /dev/shm."""
    import common.device as device

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(device, "CGROUP", str(tmp_path))
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert device.usable_cores() == (want or 64)


def test_a_too_small_dev_shm_is_one_error_line_before_any_worker_starts(coco_dir, tmp_path, monkeypatch):
    from conftest import small_shm
    from stage1_extract.__main__ import main

    small_shm(monkeypatch, free=64 * 2**20)
    r = CliRunner().invoke(main, ["--images", str(coco_dir / "images"), "--captions", str(coco_dir / "captions.json"),
                                  "--out", str(tmp_path / "c.h5"), "--backbone", "mobilenet_v2", "--weights", "none",
                                  "--device", "cpu", "--workers", "4", "--batch-size", "64", "--limit", "8",
                                  "--no-progress"])
    lines = r.output.strip().splitlines()
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: /dev/shm"), r.output
    assert "--shm-size" in lines[0]


def test_a_cache_started_in_fp32_is_not_resumed_or_reused_in_bf16(coco_dir, tmp_path, monkeypatch):
    import h5py

    from common.backbones import Backbone
    from common.feature_cache import CacheError, read_meta
    from stage1_extract.cache_writer import CacheWriter
    from stage1_extract.extract import ExtractConfig, setup_extract, extract

    cfg = ExtractConfig(images=str(coco_dir / "images"), captions=str(coco_dir / "captions.json"),
                        out=str(tmp_path / "c.h5"), backbone="mobilenet_v2", weights="none", workers=0, device="cpu",
                        limit=4, progress=False)
    extract(cfg)
    assert read_meta(cfg.out).precision == "float32"
    from stage1_extract.distributed import Dist

    records, _, _, fp32 = setup_extract(cfg, Dist())
    monkeypatch.setattr(Backbone, "precision", property(lambda self: "bfloat16"))  # as on a GPU
    with pytest.raises(CacheError, match="precision"):
        extract(cfg)
    half = ExtractConfig(**{**cfg.__dict__, "out": str(tmp_path / "half.h5")})
    CacheWriter(half.out, [r.key for r in records], fp32).close()  # unfinished work, started on the CPU
    with pytest.raises(CacheError, match="precision"):
        extract(half)
    with h5py.File(cfg.out, "a") as f:  # a cache from before the attribute: made in float32
        del f.attrs["precision"]
    assert read_meta(cfg.out).precision == "float32"


# --- sweeps on GPUs (faked: NVML answers, no CUDA context) ------------------------------------------------------

def test_importing_the_sweep_asks_nvml_not_cuda():
    import stage2_decoder.sweep  # noqa: F401

    assert os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1"


def test_a_sweep_on_cuda_spreads_runs_over_the_gpus_a_few_per_gpu_and_forks_only_without_a_cuda_context(
        shared_cache, tmp_path, monkeypatch):
    import json

    import stage2_decoder.sweep as sweep
    import stage2_decoder.sweeps.run as sweep_run
    import stage2_decoder.sweeps.sweep as sweep_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(sweep_run, "_cpu_count", lambda: 16)
    specs = [sweep_mod.RunSpec(f"r{i}", str(tmp_path / f"r{i}"), str(shared_cache), {}) for i in range(4)]
    assert sweep_run.visible_gpus(specs) == ["0", "1"] and sweep_run.default_jobs(["0", "1"]) == 2 * sweep_run.RUNS_PER_GPU
    assert sweep_run.visible_gpus([sweep_mod.RunSpec("c", "c", "f", {"device": "cpu"})]) == []
    assert sweep_run.default_jobs([]) == 16
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert sweep_run.visible_gpus(specs) == ["3", "5"]
    assert sweep_run._may_fork(1)  # this test process has run torch ops: only one-thread runs fork
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert not sweep_run._may_fork(1)  # a fresh interpreter per run: a forked child cannot use the CUDA context
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def fake_run(spec, threads):  # what the forked child sees, instead of training
        rec = {"run": spec.name, "status": "ok", "params": spec.params, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}
        (Path(spec.run_dir) / sweep_run.RESULT).write_text(json.dumps(rec))
        return rec

    monkeypatch.setattr(sweep_run, "_run_one", fake_run)
    monkeypatch.setattr(sweep_run, "read_result",
                        lambda spec: json.loads((Path(spec.run_dir) / sweep_run.RESULT).read_text())
                        if (Path(spec.run_dir) / sweep_run.RESULT).exists() else None)
    cfg = sweep.SweepConfig(features=str(shared_cache), out=str(tmp_path), grid={"lr": [1e-3]}, progress=False)
    done = sweep_mod._execute(cfg, specs, type("Bar", (), {"update": lambda self, n=1: None})())
    gpus = sorted(r["gpu"] for r in done.values())
    assert gpus == ["3", "3", "5", "5"]  # each run saw one GPU, both GPUs used evenly


def test_damaged_features_are_found_on_the_host_before_any_upload(shared_cache, tmp_path):
    """A non-finite cache is refused from its host arrays: no features tensor is moved (to the GPU) first."""
    import h5py
    from torch.overrides import TorchFunctionMode

    from common.feature_cache import CacheError
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    bad = tmp_path / "bad.h5"
    shutil.copy(shared_cache, bad)
    with h5py.File(bad, "a") as f:
        n, d = f["features"].shape
        f["features"][3, 5] = float("nan")

    class Uploads(TorchFunctionMode):
        moved = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "to" and args and getattr(args[0], "shape", None) == (n, d):
                Uploads.moved.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with Uploads(), pytest.raises(CacheError, match="non-finite"):
        train(TrainConfig(features=str(bad), out=str(tmp_path / "run"), epochs=1, scst_epochs=0, batch_size=16,
                          embed_size=16, hidden_size=32, vocab_threshold=2, dry_run=True, device="cpu",
                          progress=False))
    assert Uploads.moved == []


def test_the_prepared_gpu_run_goes_through_on_the_cpu(data_dir, coco_dir, tmp_path):
    """bench/gpu_device.sh --device cpu --tiny: every part of the device check (COCO-size JPEGs, extract, train + SCST,
    the full-size stage 2 workload at a small size, sync counting, the profile, the sweep CLI, torchrun, caption) on
    a few images, one JSON line each and gpu.json complete. In the default run: the script that proves the GPU path
    must not rot while no GPU is at hand."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "WORK": str(work)}
    p = subprocess.run(["bash", "bench/gpu_device.sh", "--device", "cpu", "--tiny", "--data", str(data_dir)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + (out / "stderr.log").read_text()[-3000:]
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [x["part"] for x in lines] == ["jpegs", "stage1", "choices", "train", "stage2", "syncs", "profile", "sweep",
                                          "torchrun", "caption"]
    assert all(x["status"] == "ok" for x in lines), lines
    assert (out / "gpu.jsonl").read_text().splitlines() == [json.dumps(x) for x in lines]
    assert "torch" in (out / "env.txt").read_text() and (out / "stdout.log").read_text() in p.stdout
    doc = json.loads((out / "gpu.json").read_text())
    assert doc["stage1"]["jpeg_size"] == [640, 480] and doc["stage1"]["end_to_end_img_s"] > 0
    assert all(doc["stage2"][k] > 0 for k in ("xe_epoch_s", "scst_epoch_s", "val_500_beam3_s", "recipe_projected_s"))
    assert doc["sweep"]["ok"] == doc["sweep"]["runs"] == 2 and doc["torchrun_equal"] is True
    assert lines[8]["processes"] == 2  # torchrun's ranks split the images: the distributed code runs
    assert doc["caption_cold_start_s"] > 0 and doc["syncs"] == {"xe_step": None, "scst_step": None, "beam": None,
                                                        "results_reads": dict.fromkeys(("xe_step", "scst_step", "beam"))}
    folder = doc["caption_folder"]
    assert folder["images"] == 8 and folder["same_captions"] is True and folder["read_threads"] >= 1
    assert folder["img_s_read_threads_0"] > 0 and folder[f"img_s_read_threads_{folder['read_threads']}"] > 0
    ch = doc["stage1_choices"]
    assert set(ch["forward_img_s_by_batch"]) == {"4", "8"} and ch["forward_img_s_contiguous"] > 0
    from common.backbones import default_workers

    w = default_workers()
    assert {f"batch 64, workers {w}", f"batch 8, workers {w}", f"batch 8, workers {max(1, w - 1)}"} \
        == set(ch["end_to_end_img_s"])
    assert all(v > 0 for v in ch["end_to_end_img_s"].values())
    prof = doc["profile"]
    assert set(prof) == {"xe_step", "scst_step", "beam", "stage1_forward"}
    for section in prof.values():  # off CUDA: CPU ops, no GPU share
        assert section["wall_ms_per_step"] > 0 and section["gpu_busy"] is None and section["top"]
        assert all(ms >= 0 and calls >= 1 for _, ms, calls in section["top"])
    assert any(name.startswith("aten::") and "conv" in name for name, _, _ in prof["stage1_forward"]["top"])
    rows = [ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("| ")]  # gpu_report.py's
    assert any(f"| {doc['stage2']['xe_epoch_s']:g} s |" in r and r.startswith("| cross-entropy epoch") for r in rows)
    assert sum("mobilenet_v2" in r for r in rows) == 2 and any(r.startswith("| xe_step | ") for r in rows)
    assert any(r.startswith("| the next batch's files read in ") for r in rows)
    assert any(r.startswith(f"| end to end over 16 JPEGs, batch 64, workers {w} | ") for r in rows)
    assert any(r.startswith("| forward alone, batch 8, without channels_last | ") for r in rows)
    assert ch["torchvision_decode_img_s"] > 0 and ch["decode_only_img_s"] == doc["stage1"]["decode_only_img_s"]
    assert any(r.startswith("| decoding alone, torchvision.io.decode_jpeg on the device in one process (16 JPEGs) | ")
               for r in rows)


def test_the_device_wrapper_goes_on_when_a_carried_wheel_does_not_install(tmp_path):
    """bench/gpu_device.sh installs .whl/ into a folder of its own and puts it and .whl/site on PYTHONPATH; a wheel
    that does not install is noted in pip.log and the check still runs (under `set -e` it ended the script)."""
    import subprocess
    import sys

    from conftest import REPO

    (tmp_path / "bench").mkdir()
    shutil.copy(REPO / "bench" / "gpu_device.sh", tmp_path / "bench")
    # a stand-in for the check: what it was started with, and whether the carried folders are importable
    (tmp_path / "bench" / "gpu.py").write_text(
        "import os, sys, importlib.util as u\n"
        "print('ARGS', ' '.join(sys.argv[1:]))\n"
        "print('SITE', u.find_spec('carried_scorer') is not None)\n"
        "print('PATH', os.environ['PYTHONPATH'])\n")
    (tmp_path / ".whl" / "site" / "carried_scorer").mkdir(parents=True)
    (tmp_path / ".whl" / "site" / "carried_scorer" / "__init__.py").write_text("")
    (tmp_path / ".whl" / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip file")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "WORK": str(work)}
    p = subprocess.run(["bash", "bench/gpu_device.sh", "--parts", "caption"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "pip could not install .whl/" in p.stdout and (out / "pip.log").read_text().strip()
    args = next(ln for ln in p.stdout.splitlines() if ln.startswith("ARGS "))
    assert args == f"ARGS --device cuda --work {work} --results {out} --parts caption"
    assert "SITE True" in p.stdout
    path = next(ln for ln in p.stdout.splitlines() if ln.startswith("PATH ")).split(" ", 1)[1].split(os.pathsep)
    assert str(work / "site") in path and str(tmp_path / ".whl" / "site") in path


def test_the_gpu_report_says_which_targets_a_run_meets(monkeypatch):
    """bench/gpu_report.py: floor and goal by the right sense (img/s higher, seconds lower), "not measured" where
    a part measured nothing, and the headline: all of COCO through stage 1 at the end-to-end rate plus the recipe."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_report

    assert gpu_report.verdict(5000, "min", 3000, 5000) == "goal"
    assert gpu_report.verdict(4999, "min", 3000, 5000) == "floor"
    assert gpu_report.verdict(2999, "min", 3000, 5000) == "missed"
    assert gpu_report.verdict(15, "max", 30, 15) == "goal" and gpu_report.verdict(31, "max", 30, 15) == "missed"
    assert gpu_report.verdict(0, "max", 0, 0) == "goal" and gpu_report.verdict(None, "max", 0, 0) == "not measured"
    doc = {"stage1": {"end_to_end_img_s": 4000.0, "forward_img_s": 12000.0, "backbone": "resnet152"},
           "stage2": {"images": 123_287, "xe_epoch_s": 20.0, "recipe_projected_s": 400.0}, "syncs": {"xe_step": 0.0}}
    assert gpu_report.headline(doc) == pytest.approx(123_287 / 4000 + 400)
    rows = {r.split(" | ")[0][2:]: r for r in gpu_report.report(doc).splitlines() if r.startswith("| ")}
    assert rows["stage 1 resnet152, decode + forward + write, COCO-size JPEGs"].endswith("| 4,000 img/s | floor |")
    assert rows["stage 1 resnet152 forward alone, bf16"].endswith("| goal |")
    assert rows["cross-entropy epoch, full COCO size"].endswith("| 20 s | floor |")
    assert rows["SCST epoch, full COCO size"].endswith("| - | not measured |")
    assert rows["host syncs per cross-entropy step"].endswith("| 0 | goal |")
    headline = rows["all of COCO, JPEGs to an SCST-trained captioner (stage 1 + recipe), projected"]
    assert headline.endswith("| 431 s | yes |")
    # stage 2 timed on fewer images (a --tiny run) is not rated against full-size targets: it met every goal
    doc["stage2"]["images"], doc["stage1"]["precision"] = 400, "float32"
    rows = {r.split(" | ")[0][2:]: r for r in gpu_report.report(doc).splitlines() if r.startswith("| ")}
    assert rows["cross-entropy epoch, full COCO size"].endswith("| 20 s | not full size (400 images) |")
    assert rows["default recipe (20 XE + 2 SCST epochs with validation), projected"].endswith("| not full size (400 images) |")
    assert rows["all of COCO, JPEGs to an SCST-trained captioner (stage 1 + recipe), projected"].endswith(
        "| not full size (400 images) |")
    assert rows["stage 1 resnet152 forward alone, float32"].endswith("| goal |")  # it said bf16
    assert rows["500-image beam-3 validation"].endswith("| - | not measured |")
    doc["stage2"]["val_500_beam3_s"] = 0.5  # 20 validation images in a --tiny run
    rows = {r.split(" | ")[0][2:]: r for r in gpu_report.report(doc).splitlines() if r.startswith("| ")}
    assert rows["500-image beam-3 validation"].endswith("| 0.5 s | not full size (400 images) |")


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", '{"stage1": 5, "stage2": {"xe_epoch_s": "fast"}, "profile": '
                                  '{"beam": [1]}, "notes": "x"}'])
def test_the_gpu_report_takes_a_damaged_results_file_without_a_traceback(tmp_path, text):
    import subprocess
    import sys

    from conftest import REPO

    bad = tmp_path / "gpu.json"
    bad.write_text(text)
    p = subprocess.run([sys.executable, "bench/gpu_report.py", str(bad)], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert "Traceback" not in p.stderr
    if text.startswith("{\"stage1"):  # a JSON object: its measures that are not numbers are "not measured"
        assert p.returncode == 0 and "| cross-entropy epoch, full COCO size | <= 30 s | <= 15 s | - | not measured |" \
            in p.stdout
    else:
        assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
