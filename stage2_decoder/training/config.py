"""The training settings (TrainConfig): one typed field per `python -m stage2_decoder.train` option,
and what may change when a run is resumed.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from common.bounds import check_fields
from common.tokenizer import TOKENIZERS
from stage2_decoder.model import DecoderConfig


@dataclass
class TrainConfig:
    features: str
    out: str
    captions: str | None = None  # default: the captions file recorded in the cache
    images: str | None = None  # default: the images folder recorded in the cache
    dataset: str | None = None  # default: the format recorded in the cache
    # with the weight average, validation still improves past 12 epochs (docs/defaults.md)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    embed_size: int = 256
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float = 0.5  # on word embeddings and LSTM outputs (docs/defaults.md)
    # score words against their own input embeddings (DecoderConfig.tie_embeddings): helps rare words (docs/defaults.md)
    tie_embeddings: bool = True
    vocab_threshold: int = 4
    tokenizer: str = "nltk"  # nltk | whitespace | chars (languages written without spaces); kept in the vocabulary
    max_caption_len: int = 50
    val_frac: float = 0.05
    test_frac: float = 0.05
    split_seed: int = 0
    label_smoothing: float = 0.0
    # >0: validate, select and save a per-step moving average of the cross-entropy weights (~1/(1-decay) steps)
    ema_decay: float = 0.995
    # warm the average up by bias correction: its n-th update moves it by (1 - d) / (1 - d ** n) (docs/defaults.md)
    ema_warmup: bool = True
    # the average follows the trained weights for this many steps, then averages (0.995's window; docs/defaults.md)
    ema_start: int = 200
    # the projection's BatchNorm running statistics a plain average of the batches until 1 / 0.01 steps (docs/defaults.md)
    bn_warmup: bool = True
    train_views: bool = True  # cross-entropy: each caption's image from a random cached view, if the cache has several
    length_buckets: int = 16  # batch captions of like length, sorted within runs of this many batches (1 = random)
    select_by: str = "cider"  # best.pt by validation "cider" (decoded as --val-beam-size says) or "loss"
    patience: int = 0  # early stop after this many epochs without a better best (0 = never)
    # halve (lr_factor) the rate after this many epochs without a better score; 1 chased noise (docs/defaults.md)
    lr_patience: int = 3
    lr_factor: float = 0.5
    scst_epochs: int = 2  # then this many self-critical epochs (CIDEr-D reward) from the best model
    # one SCST epoch at this rate beat a lower rate with 4x the steps; more epochs overfit (docs/defaults.md)
    scst_lr: float = 1e-4
    scst_views: bool = False  # SCST: each image's feature from a random cached view (as --train-views does)
    scst_samples: int = 5  # captions sampled per image; each one's baseline is the mean of the others
    scst_max_len: int = 16  # most words per sampled SCST caption (docs/defaults.md)
    # validation decodes as the captioner does (1 = greedy) to pick best.pt and the schedule (docs/defaults.md)
    val_beam_size: int = 3
    val_images: int = 500  # validation images decoded for CIDEr each epoch (0 = all)
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    dry_run: bool = False  # one batch per epoch: the cheap mode tests use

    # a resume from last.pt may change these, and they apply to the epochs still to run (config.json records it)
    RESUME_APPLIED = ("epochs", "scst_epochs", "patience")
    # where the data is and how the run is shown, not the training math (another captions file that changes the
    # split or the vocabulary is refused all the same; --dry-run's one-batch epochs are training math)
    RESUME_FREE = ("out", "captions", "images", "dataset", "device", "progress")
    # every other field changes the math and must not change on resume (set below, new fields included)
    RESUME_FIXED = ()
    # what a run from before the setting existed did, where that is not the field's default
    RESUME_LEGACY = {"val_beam_size": 1, "tie_embeddings": False, "tokenizer": "nltk", "ema_warmup": False,
                     "ema_start": 0, "bn_warmup": False}

    # the string settings' values (the CLI's choices; a sweep grid is checked against them up front)
    CHOICES = {"tokenizer": TOKENIZERS, "select_by": ("cider", "loss")}

    def __post_init__(self):
        # each number within common.bounds' limits, as the CLI and a sweep grid check it, named as the option
        check_fields(self, lambda name: "--" + name.replace("_", "-"))

    def decoder_config(self, feature_dim: int, vocab_size: int) -> DecoderConfig:
        """The decoder these settings train (train() and the benchmarks build it from here)."""
        return DecoderConfig(feature_dim, vocab_size, self.embed_size, self.hidden_size, self.num_layers,
                             self.dropout, self.tie_embeddings)

    def optimizer(self, params) -> torch.optim.Adam:
        """The optimiser these settings train with (train() and the benchmarks build it from here).
        Fused on every device: one kernel per step on CUDA, and a faster step on the CPU too."""
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=True)


TrainConfig.RESUME_FIXED = tuple(f.name for f in fields(TrainConfig)
                                 if f.name not in TrainConfig.RESUME_APPLIED + TrainConfig.RESUME_FREE)
