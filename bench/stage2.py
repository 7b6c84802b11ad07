"""Stage 2 benchmark: cached decoder training against the seed notebook's end-to-end loop, and
our training step against a bare LSTM step, measured in one run.

    .venv/bin/python bench/stage2.py [--images 100] [--seed-batches 3] [--threads 1] [--tiny] [--check]

On the first N COCO-mini images (their training-split captions):
1. ours: stage 1 once (`stage1_extract.extract`, ResNet-152 with `--weights none`: random
   weights, the same compute; ImageNet weights cannot be had offline), then the real `train()`
   for 5 epochs in a child process (its wall time inside the child, and its peak RSS);
2. the seed notebook's approach (yunjey/pytorch-tutorial): every (image, caption) pair is read
   from its JPEG, resized to 256x256, RandomCrop(224) + RandomHorizontalFlip, normalised and sent
   through the frozen CNN, every epoch, then the decoder step. A seed epoch is far too slow to run
   whole on a small CPU, so it is timed over a few batches after a warm-up batch and
   extrapolated to the epoch's pairs (printed as such). The seed gets our CNN (channels_last) and
   our decoder step, so the ratio is what the cache buys, not those optimisations;
3. captions/s of train()'s own epoch function (gather + `train_step` per batch, length-bucketed
   batches) against a bare `nn.LSTM` + `nn.Linear` + Adam step on the very same batch shapes,
   alternated, medians of repeats.
Targets (CPU, resnet152): >= 50x per epoch, >= 15x for 5 epochs, step overhead <= 15%, peak RSS
under cache + model + 1.5 GB.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # noqa: F401  (puts the repository on sys.path)
from harness import WEIGHTS, Report, cache_dtype, default_data, median, pin_threads, timed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision.models  # noqa: E402,F401  (imported before any timing, for ours and the seed alike)
from torch import nn  # noqa: E402

from common.feature_cache import load_cache  # noqa: E402
from stage1_extract.extract import ExtractConfig, extract  # noqa: E402
from stage2_decoder.model import CaptionDecoder, DecoderConfig  # noqa: E402
from stage2_decoder.training.config import TrainConfig  # noqa: E402
from stage2_decoder.training.data import prepare_data  # noqa: E402
from stage2_decoder.training.ema import EMA  # noqa: E402
from stage2_decoder.training.epochs import train_step, xe_epoch  # noqa: E402
from stage2_decoder.training.pairs import CaptionBatch, CaptionPairs  # noqa: E402

# the child that runs train() alone in its process, so its peak RSS is training's own
_CHILD = """
import json, resource, sys, time
import torch
import torch._dynamo  # what the first torch.optim optimizer imports: an import, untimed as the seed's are
torch.set_num_threads(int(sys.argv[2]))
from stage2_decoder.train import TrainConfig, train
cfg = TrainConfig(**json.loads(sys.argv[1]))
t0 = time.perf_counter()
r = train(cfg)
print(json.dumps({"seconds": time.perf_counter() - t0, "history": r.history,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run_ours_training(cache: Path, run: Path, epochs: int, threads: int) -> dict:
    # cross-entropy epochs only, like the seed's: the optional self-critical phase after them is another method
    cfg = dict(features=str(cache), out=str(run), epochs=epochs, scst_epochs=0, device="cpu", progress=False)
    p = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg), str(threads)], cwd=harness.REPO,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"training child failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


class SeedPairs(torch.utils.data.Dataset):
    """The seed notebook's dataset: item i = (transformed image of pair i, i), decoded every time."""

    def __init__(self, paths: list[str]):
        from torchvision import transforms

        from common.preprocess import IMAGENET_MEAN, IMAGENET_STD

        self.paths = paths
        self.transform = transforms.Compose([
            transforms.Resize((256, 256)),  # the notebook's resize.py step, done here on the fly
            transforms.RandomCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), i


def seed_per_pair(cnn: nn.Module, pairs: CaptionPairs, paths_by_row: dict[int, str], vocab_size: int,
                  feature_dim: int, batch_size: int, n_batches: int, workers: int) -> tuple[float, int]:
    """Seconds per (image, caption) pair of the seed loop, over n_batches after one warm-up batch."""
    paths = [paths_by_row[int(r)] for r in pairs.rows]
    loader = torch.utils.data.DataLoader(SeedPairs(paths), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True)
    decoder = CaptionDecoder(DecoderConfig(feature_dim, vocab_size)).train()
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    times = []
    it = iter(loader)
    for b in range(n_batches + 1):
        t0 = time.perf_counter()
        images, idx = next(it)
        with torch.no_grad():  # the frozen CNN, on every pair, every epoch
            feats = cnn(images.contiguous(memory_format=torch.channels_last))
        tb = pairs.gather(idx)
        train_step(decoder, opt, CaptionBatch(feats[tb.order], tb.inputs, tb.targets, tb.lengths), "cpu", 5.0)
        if b:  # the first batch pays for worker start-up and kernel selection
            times.append(time.perf_counter() - t0)
    del it
    return sum(times) / (len(times) * batch_size), len(times) * batch_size


class BareStep:
    """The reference: nn.LSTM + output Linear + Adam on in-memory inputs of our batches' shapes.
    `tie`: the output layer's matmuls of a tied decoder (hidden -> embed -> vocabulary)."""

    def __init__(self, batches: list[CaptionBatch], embed: int, hidden: int, layers: int, vocab_size: int,
                 tie: bool = False):
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.out = nn.Sequential(nn.Linear(hidden, embed), nn.Linear(embed, vocab_size)) if tie \
            else nn.Linear(hidden, vocab_size)
        self.opt = torch.optim.Adam([*self.lstm.parameters(), *self.out.parameters()], lr=1e-3)
        self.data = []
        for b in batches:
            t = b.inputs.shape[1]
            mask = torch.arange(t)[None] < b.lengths[:, None]  # (B, T) real positions
            self.data.append((torch.randn(len(b.lengths), 1 + t, embed), mask, b.targets[mask]))

    def run(self) -> None:
        for x, mask, targets in self.data:
            h, _ = self.lstm(x)  # (B, 1 + T, H): image step + words, like ours
            loss = F.cross_entropy(self.out(h[:, 1:][mask]), targets)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()


def step_efficiency(pairs: CaptionPairs, features: torch.Tensor, vocab_size: int, cfg: TrainConfig,
                    repeats: int, passes: int) -> tuple[float, float, int]:
    """(ours, bare) captions/s: train()'s own epoch function for `passes` epochs against the bare step
    on the very batches those epochs draw; medians of alternated repeats."""
    shapes = []
    for epoch in range(passes):  # _xe_epoch seeds each epoch's batch order with (seed, epoch) like this
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        shapes += [pairs.gather(i) for i in pairs.batches(cfg.batch_size, g, cfg.length_buckets) if len(i) > 1]
    model = CaptionDecoder(cfg.decoder_config(features.shape[1], vocab_size)).train()  # as train() builds it
    opt = cfg.optimizer(model.parameters())  # as train() builds it
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None  # the default weight average, as train() keeps it
    bare = BareStep(shapes, cfg.embed_size, cfg.hidden_size, cfg.num_layers, vocab_size, cfg.tie_embeddings)
    n = sum(len(b.lengths) for b in shapes)
    steps = math.ceil(len(pairs) / cfg.batch_size)

    def ours() -> None:  # gather, train_step (forward, loss, backward, clip, Adam), loss bookkeeping, EMA
        for epoch in range(passes):
            xe_epoch(model, opt, pairs, features, "cpu", cfg, epoch, steps, ema)

    ours(), bare.run()  # warm-up: allocator, oneDNN kernel selection
    t_ours, t_bare = [], []
    for _ in range(repeats):
        t_ours.append(timed(ours)[0])
        t_bare.append(timed(bare.run)[0])
    return n / median(t_ours), n / median(t_bare), n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--backbone", default=None, help="resnet152 (default), or mobilenet_v2 in --tiny")
    ap.add_argument("--images", type=int, default=100, help="first N COCO-mini images")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed-batch-size", type=int, default=32)
    ap.add_argument("--seed-batches", type=int, default=3, help="timed seed batches (after one warm-up)")
    ap.add_argument("--batch-size", type=int, default=16, help="stage 1 batch size")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers (stage 1 and the seed loop)")
    ap.add_argument("--repeats", type=int, default=3, help="alternated repeats of the step benchmark")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--tiny", action="store_true", help="seconds-long smoke mode (mobilenet_v2, 12 images)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    if args.tiny:
        args.images, args.epochs, args.seed_batch_size, args.seed_batches, args.repeats = 12, 2, 4, 1, 1
        args.backbone = args.backbone or "mobilenet_v2"
    backbone = args.backbone or "resnet152"
    pin_threads(args.threads)
    coco = args.data / "coco2017-mini"
    rep = Report(f"stage 2: {backbone}, first {args.images} COCO-mini images, {args.threads} thread(s)")

    with tempfile.TemporaryDirectory(prefix="bench-stage2-") as tmp:
        tmp = Path(tmp)
        cache = tmp / f"coco{args.images}-{backbone}.h5"
        # ours, part 1: one extraction (the whole call: model build, dataset, workers, shards, assembly)
        t_extract, s = timed(lambda: extract(ExtractConfig(
            images=str(coco / "images"), captions=str(coco / "captions.json"), out=str(cache), dataset="coco",
            backbone=backbone, weights=WEIGHTS[backbone], batch_size=args.batch_size, workers=args.workers,
            device="cpu", limit=args.images, progress=False, dtype=cache_dtype(backbone))))
        # ours, part 2: train() for the epochs, alone in a child process
        child = run_ours_training(cache, tmp / "run", args.epochs, args.threads)
        ours_epoch = child["seconds"] / args.epochs  # all in: data, vocab, validation, checkpoints, plots
        loop_epoch = median([h["seconds"] for h in child["history"]])

        fc = load_cache(cache)
        cfg = TrainConfig(features=str(cache), out=str(tmp / "unused"), progress=False)
        parts, _, vocab, rows, tokens = prepare_data(cfg, fc)
        pairs = CaptionPairs(parts["train"], rows, vocab, cfg.max_caption_len, tokens)
        paths_by_row = {rows[r.key]: r.path for r in parts["train"]}

        # the seed approach: the same train pairs, the CNN on each of them
        from common.backbones import load_backbone

        t_seed_build, cnn = timed(lambda: load_backbone(backbone, WEIGHTS[backbone], "cpu").model)
        per_pair, timed_pairs = seed_per_pair(cnn, pairs, paths_by_row, len(vocab), fc.meta.feature_dim,
                                              args.seed_batch_size, args.seed_batches, args.workers)
        del cnn
        seed_epoch = per_pair * len(pairs)
        seed_run = args.epochs * seed_epoch + t_seed_build  # builds its CNN once, as extract() does

        # our step vs a bare LSTM step, same shapes
        features = torch.from_numpy(fc.features).float()
        passes = 1 if args.tiny else max(1, 1000 // len(pairs))
        ours_cps, bare_cps, n_step = step_efficiency(pairs, features, len(vocab), cfg, args.repeats, passes)

        cache_mb = cache.stat().st_size / 2**20
        decoder = CaptionDecoder(cfg.decoder_config(fc.meta.feature_dim, len(vocab)))
        model_params = sum(p.numel() for p in decoder.parameters())
        # weights + Adam's two moments + the weight average (--ema-decay, on by default), float32
        model_mb = model_params * 4 * (4 if cfg.ema_decay else 3) / 2**20
        rss_mb = child["maxrss_kb"] / 1024
        limit_mb = cache_mb + model_mb + 1536

    n_pairs = len(pairs)
    print(f"{args.images} images, {n_pairs} training pairs (train split), vocabulary {len(vocab)} words; "
          f"stage 1 {s.done_now} images in {t_extract:.1f}s ({s.images_per_s:.2f} images/s in the loop)")
    rep.table(["what", "seconds", "note"], [
        ["ours: extraction (once)", t_extract, f"{args.images} images, whole extract() call"],
        ["ours: epoch, all in", ours_epoch, f"train() wall / {args.epochs} epochs (setup, validation, checkpoints)"],
        ["ours: epoch, loop + validation", loop_epoch, "median of metrics.jsonl 'seconds'"],
        ["seed: epoch (EXTRAPOLATED)", seed_epoch, f"from {timed_pairs} timed pairs ({args.seed_batches} batches "
                                                  f"of {args.seed_batch_size}) x {n_pairs} pairs"],
        [f"ours: {args.epochs} epochs", t_extract + child["seconds"], "extraction + train() wall"],
        [f"seed: {args.epochs} epochs (EXTRAPOLATED)", seed_run, f"{args.epochs} epochs + CNN build "
                                                                   f"({t_seed_build:.1f}s)"],
    ])
    rep.table(["training step", "captions/s", "note"], [
        ["ours: train()'s epoch loop", ours_cps, f"gather + forward (dropout {cfg.dropout}) + loss + backward + "
                                                 f"clip + Adam, {n_step} captions"],
        ["bare: LSTM + Linear + Adam", bare_cps, "same batch shapes, in-memory inputs"],
    ])
    print(f"memory: training peak RSS {rss_mb:.0f} MB; limit cache {cache_mb:.1f} MB + model {model_mb:.1f} MB "
          f"(weights, Adam moments, weight average) + 1536 MB = {limit_mb:.0f} MB")
    rep.ratio("stage2.per_epoch seed/ours", seed_epoch / ours_epoch, 50, note="seed extrapolated")
    rep.ratio(f"stage2.{args.epochs}_epochs seed/ours", seed_run / (t_extract + child["seconds"]), 15,
              note="seed extrapolated")
    rep.ratio("stage2.step_overhead bare/ours - 1", bare_cps / ours_cps - 1, 0.15, higher_is_better=False, unit="")
    rep.ratio("stage2.peak_rss / limit", rss_mb / limit_mb, 1.0, higher_is_better=False, unit="")
    return rep.done(args.check)


if __name__ == "__main__":
    sys.exit(main())
