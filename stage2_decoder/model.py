"""Show-and-Tell decoder: projected image feature as the LSTM's first input, then the words."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from common.vocab import Vocabulary


@dataclass
class DecoderConfig:
    feature_dim: int  # D of the cached backbone features
    vocab_size: int
    embed_size: int = 256
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float = 0.0  # on word embeddings / LSTM outputs (and between LSTM layers)
    # the output layer shares the word embedding matrix: logits = embed.W @ Linear(H -> E)(h) + b
    # (Press & Wolf 2017, Inan et al. 2017); absent from checkpoints written before it existed
    tie_embeddings: bool = False


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU mask comes from uniform draws (`rand_like(x) >= p`): PyTorch's CPU
    `bernoulli_` is ~4x slower and was a training step's largest cost over a bare LSTM step
    (bench/RESULTS.md). The same distribution, other draws; CUDA keeps the native fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return x * (torch.rand_like(x) >= self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))


class WarmBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose running statistics start as the plain average of the batches seen so far (the n-th
    batch weighs 1/n) until that weight falls to `momentum`, then move by `momentum` as usual. From their
    initial 0 and 1 at 0.01 a step, after the ~60 steps of a short run they were still about half their
    start: the evaluated embeddings were off-centre and half their scale (docs/defaults.md). Training math
    is unchanged (batch statistics); from step 1 / momentum on, so are the running ones. `warmup` False:
    nn.BatchNorm1d. The count is kept in Python too, so a step reads nothing back from the device."""

    def __init__(self, num_features: int, momentum: float, warmup: bool = True):
        super().__init__(num_features, momentum=momentum)
        self.base_momentum = momentum
        self.warmup = warmup
        self._seen: int | None = None  # read from num_batches_tracked on the first training step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.warmup:
            if self._seen is None:
                self._seen = int(self.num_batches_tracked)  # one read per model (a resume's count)
            self._seen += 1  # as num_batches_tracked is about to be
            self.momentum = max(self.base_momentum, 1.0 / self._seen)
        return super().forward(x)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._seen = None  # a loaded count is read again on the next training step


class CaptionDecoder(nn.Module):
    """features (B, D) -> Linear+BatchNorm -> (B, E) image embedding fed at t=0; then the LSTM
    reads <start> w1 .. wn and is trained to emit w1 .. wn <end>."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.project = nn.Linear(cfg.feature_dim, cfg.embed_size)
        self.bn = WarmBatchNorm1d(cfg.embed_size, momentum=0.01)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_size, padding_idx=Vocabulary.pad_id)
        self.drop = Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.embed_size, cfg.hidden_size, cfg.num_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        if cfg.tie_embeddings:
            self.out_proj = nn.Linear(cfg.hidden_size, cfg.embed_size)
            self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        else:
            self.out = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        # (V,) True on <pad>, <start>, <unk>: built once and moved with the model, so a decoding step masks
        # without turning a Python list into a device index (a blocking upload per step on CUDA); not
        # persistent: checkpoints keep their keys
        banned = torch.isin(torch.arange(cfg.vocab_size), torch.tensor(
            [Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id]))
        self.register_buffer("banned_words", banned, persistent=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LSTM outputs (..., H) -> next-word logits (..., V)."""
        if self.cfg.tie_embeddings:
            return nn.functional.linear(self.out_proj(h), self.embed.weight, self.out_bias)
        return self.out(h)

    def image_embedding(self, features: torch.Tensor) -> torch.Tensor:
        return self.bn(self.project(features.float()))  # (B, E)

    def run_lstm(self, x: torch.Tensor, state=None):
        """The LSTM over x (B, T, E), in fp32 with autocast off: autocast casts cuDNN's LSTM to fp16 whatever
        dtype it was asked for, and fp16 without loss scaling flushes its small gradients to zero; the
        FLOPs are in the projections around it, which stay under the caller's (bf16) autocast. On Ampere and
        newer GPUs cuDNN runs it in TF32 (PyTorch's default `cudnn.allow_tf32`): fp32's exponent range, which
        is what the gradients need, with a 10-bit mantissa (docs/gpu.md)."""
        with torch.autocast(x.device.type, enabled=False):
            return self.lstm(x.float(), state)

    def init_state(self, features: torch.Tensor):
        """Run the t=0 step on the image embedding; returns the LSTM state (h, c), each (L, B, H)."""
        _, state = self.run_lstm(self.image_embedding(features).unsqueeze(1))
        return state

    def forward(self, features: torch.Tensor, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits for the packed targets.

        features (B, D); inputs (B, T) = <start> w1 .. wn, padded; lengths (B,) = n + 1, on the CPU and
        non-increasing (`CaptionPairs.gather` sorts: packing then needs no index upload, no device sync).
        Returns (sum(lengths), V), in the order of `pack_padded_sequence(targets, lengths,
        batch_first=True).data`.
        """
        img = self.image_embedding(features).unsqueeze(1)  # (B, 1, E): the t=0 input
        emb = self.drop(self.embed(inputs))  # (B, T, E)
        # One LSTM call over [image, words], padded: the fused kernels (oneDNN on CPU, cuDNN) run a
        # whole padded sequence several times faster than the per-step loop a packed sequence takes on
        # the CPU. Padding only follows a caption's words, so it never changes their outputs; packing
        # the outputs then drops it before the (large) vocabulary layer.
        hidden, _ = self.run_lstm(torch.cat([img, emb], 1))  # (B, 1 + T, H)
        words = pack_padded_sequence(hidden[:, 1:], lengths, batch_first=True, enforce_sorted=True).data
        return self.logits(self.drop(words))  # (sum(lengths), V)

    def step(self, tokens: torch.Tensor, state):
        """One decoding step: tokens (B,) -> log-probs (B, V), new state."""
        h, state = self.run_lstm(self.embed(tokens).unsqueeze(1), state)
        logits = self.logits(h.squeeze(1)).float()
        # never emit <pad>, <start> or <unk>: a word the vocabulary lacks is no caption word (a model
        # trained on few photos otherwise answers "a <unk> <unk> ..."); greedy, beam, sampling, SCST all call this
        logits = logits.masked_fill(self.banned_words, float("-inf"))
        return torch.log_softmax(logits, dim=-1), state
