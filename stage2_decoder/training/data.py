"""What a training run reads before its first step: the cache's records, the image split, the train-split
vocabulary, the caption tensors of the train and val images, and the cached features on the device."""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common.datasets import load_dataset, official_split, split_keys
from common.feature_cache import FeatureCache, load_cache
from common.paths import refuse_inside
from common.records import ImageRecord
from common.text import printable
from common.token_cache import tokenize_records
from common.vocab import SPECIALS, Vocabulary, build_vocab
from stage2_decoder.training.config import TrainConfig
from stage2_decoder.training.pairs import CaptionPairs

# what a cache is made with beyond the backbone description a checkpoint keeps: a cache rebuilt at the same path
# with more views, another dtype or on a GPU (other last bits) would change a resumed run's epochs
CACHE_IDENTITY = ("dtype", "views", "precision")


@dataclass
class TrainData:
    parts: dict[str, list[ImageRecord]]  # {"train" | "val" | "test": records}
    split: dict[str, list[str]]  # {split name: image keys}, as split.json stores it
    vocab: Vocabulary
    rows: dict[str, int]  # image key -> cache row
    tokens: dict[str, list[list[str]]]  # {key: one word list per caption}, train and val images
    train_set: CaptionPairs  # on the device
    val_records: list[ImageRecord]  # the images validation decodes (with references)
    val_set: CaptionPairs  # on the device
    features: torch.Tensor  # (N, D) centre view, on the device: validation and captioning see this one
    train_features: torch.Tensor  # (N, D), or (V, N, D) with --train-views
    scst_features: torch.Tensor  # (N, D), or (V, N, D) with --scst-views
    backbone: dict[str, str | int | None]  # the checkpoint's: name, weights, weights_sha256, feature_dim, preprocess
    feature_dim: int
    cache: dict[str, str | int]  # the rest of the cache's identity (CACHE_IDENTITY): a resume must find it unchanged


def prepare_data(cfg: TrainConfig, cache: FeatureCache) -> tuple[
        dict[str, list[ImageRecord]], dict[str, list[str]], Vocabulary, dict[str, int], dict[str, list[list[str]]]]:
    """Records of the cached images, the image split, the train-split vocabulary, the feature rows and
    the tokenised captions of the train and val images ({key: one word list per caption}).

    Captions are tokenised here once, by --tokenizer (NLTK: ~0.2 ms each, minutes on full COCO), for the
    vocabulary, the caption tensors and the SCST reward alike, and their tokens cached on disk
    (common/token_cache.py) for the next run on the same captions file.
    """
    m = cache.meta
    rows = cache.rows_by_key()
    if len(rows) < 3:
        raise ValueError(f"{cache.path} holds features of {len(rows)} images: training needs at least 3 (one "
                         f"each for training, validation and test)")
    # only captions are read here: the folder the cache names may be gone (made on another machine); one
    # named with --images must exist (a typo is said, not ignored)
    records = load_dataset(cfg.dataset or m.dataset_format, cfg.captions or m.captions_file,
                           cfg.images or m.images_dir, allow_outside_images=True, images_needed=cfg.images is not None)
    records = [r for r in records if r.key in rows]
    if cache.errors:  # unreadable in stage 1: no features, so their captions are not trained on
        key, why = next(iter(cache.errors.items()))
        tqdm.write(f"warning: {len(cache.errors)} images of {cache.path} could not be read in stage 1 and are left "
                   f"out (first: {printable(key)}: {printable(why)})", file=sys.stderr)
    if len(records) < 3:
        raise ValueError(f"only {len(records)} images of {cfg.captions or m.captions_file} have features in "
                         f"{cache.path}; is this the captions file the cache was made from?")
    # a Karpathy file fixes the split (comparable numbers); otherwise our deterministic hash split
    split = official_split(records) or split_keys([r.key for r in records], cfg.val_frac, cfg.test_frac,
                                                  cfg.split_seed)
    by_split = {name: set(keys) for name, keys in split.items()}
    parts = {name: [r for r in records if r.key in by_split[name]] for name in split}
    tokens = tokenize_records(cfg.captions or m.captions_file, [r for n in ("train", "val") for r in parts[n]],
                              cfg.tokenizer, progress=cfg.progress)  # read from the token cache when it has them
    vocab = build_vocab((words for r in parts["train"] for words in tokens[r.key]), cfg.vocab_threshold, cfg.tokenizer)
    if len(vocab) <= len(SPECIALS):  # a decoder that can only write <end>: refused, not trained
        counts = Counter(w for r in parts["train"] for words in tokens[r.key] for w in words)
        top = counts.most_common(1)
        raise ValueError(f"--vocab-threshold {cfg.vocab_threshold} leaves no word in the vocabulary: "
                         + (f"the most frequent training word, {top[0][0]!r}, occurs {top[0][1]} times"
                            if top else "the training captions have no words") + "; lower --vocab-threshold")
    return parts, split, vocab, rows, tokens


def load_train_data(cfg: TrainConfig, device: torch.device) -> TrainData:
    """Everything `train(cfg)` reads, checked, with the caption tensors and features on `device`; writes
    nothing (the run folder is made only once these inputs are known to be usable)."""
    cache = load_cache(cfg.features, views=cfg.train_views or cfg.scst_views)
    refuse_inside(cfg.out, cfg.images or cache.meta.images_dir, "the run")
    parts, split, vocab, rows, tokens = prepare_data(cfg, cache)
    train_set = CaptionPairs(parts["train"], rows, vocab, cfg.max_caption_len, tokens).to(device)  # beside the features
    val_records = [r for r in parts["val"] if r.captions]  # images without references cannot validate
    if not val_records:  # said always (a sweep's run.log too): such a run's val CIDEr is a training score
        tqdm.write("warning: no validation images with captions (--val-frac 0?): validating on training images, "
                   "so val CIDEr and best.pt's choice measure training fit", file=sys.stderr)
    val_records = val_records or parts["train"][:50]
    val_set = CaptionPairs(val_records, rows, vocab, cfg.max_caption_len, tokens).to(device)
    # with --train-views (--scst-views) cross-entropy (SCST) batches draw each image feature from one of the
    # cached views (stage 1 --views: centre crop, mirrored, whole image); validation and captioning see the
    # centre view only, the one a raw photo gets. Features stay in the cache's dtype (the decoder casts each
    # batch) and the centre view is held once: `features` is all_views[0], not a copy
    all_views = torch.from_numpy(cache.features)  # (N, D)
    if cache.views is not None:  # loaded only when one of the two asks for it
        all_views = torch.cat([all_views[None], torch.from_numpy(cache.views).transpose(0, 1)])  # (V, N, D)
    all_views = all_views.to(device)
    features = all_views[0] if cache.views is not None else all_views  # (N, D)
    cache.features = cache.views = None  # the tensors hold them now (a copy where views were joined)
    m = cache.meta
    backbone = {"name": m.backbone, "weights": m.weights, "weights_sha256": m.weights_sha256 or None,
                "feature_dim": m.feature_dim, "preprocess": m.preprocess}
    return TrainData(parts, split, vocab, rows, tokens, train_set, val_records, val_set, features,
                     all_views if cfg.train_views else features, all_views if cfg.scst_views else features,
                     backbone, m.feature_dim, {k: getattr(m, k) for k in CACHE_IDENTITY})
