"""Training data from the cache: (image row, caption) pairs, pre-tokenised into padded tensors."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch.utils.data import Dataset

from common.records import ImageRecord
from common.tokenizer import tokenize
from common.vocab import Vocabulary
from stage2_decoder.decoding.readback import upload


def pad_captions(seqs: Sequence[Sequence[int]], pad_id: int = 0, dtype: torch.dtype = torch.long
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded collate: id lists -> (B, T_max) tensor of `dtype` padded with pad_id, and lengths (B,)."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    out = np.full((len(seqs), int(lengths.max()) if len(seqs) else 0), pad_id,
                  dtype=torch.empty(0, dtype=dtype).numpy().dtype)
    out[np.arange(out.shape[1]) < lengths[:, None]] = np.fromiter(chain.from_iterable(seqs), dtype=out.dtype,
                                                                  count=int(lengths.sum()))  # row-major fill
    return torch.from_numpy(out), torch.from_numpy(lengths)


@dataclass
class CaptionBatch:
    features: torch.Tensor  # (B, D)
    inputs: torch.Tensor  # (B, T) <start> w1 .. wn, padded
    targets: torch.Tensor  # (B, T) w1 .. wn <end>, padded
    lengths: torch.Tensor  # (B,) n + 1, non-increasing (what `pack_padded_sequence(enforce_sorted=True)` needs)
    order: torch.Tensor | None = None  # (B,) row i is pair idx[order[i]] of the gathered idx (longest caption first)

    def __post_init__(self):  # CaptionPairs stores int32 ids; a batch hands out int64 (cross_entropy's targets)
        self.inputs, self.targets = self.inputs.long(), self.targets.long()


class CaptionPairs(Dataset):
    """Every (image row, caption) pair of a split, tokenised once into padded tensors.

    Indexing with a LongTensor of pair indices gathers a whole batch in a few tensor ops
    (no per-item Python work in the training loop); `__getitem__` with an int gives one pair.
    """

    def __init__(self, records: Sequence[ImageRecord], rows_by_key: dict[str, int], vocab: Vocabulary,
                 max_len: int = 50, tokens: dict[str, list[list[str]]] | None = None):
        """`tokens` ({key: one word list per caption}, as `train.prepare_data` makes once) spares
        tokenising the captions again."""
        rows, seqs = [], []
        for rec in records:
            row = rows_by_key.get(rec.key)
            if row is None:  # image skipped by stage 1 (unreadable)
                continue
            tokenised = tokens[rec.key] if tokens is not None else [tokenize(c, vocab.tokenizer)
                                                                     for c in rec.captions]
            for words in tokenised:
                words = words[: max_len]
                if not words:  # empty or punctuation-only caption teaches nothing
                    continue
                rows.append(row)
                seqs.append(vocab.encode(words))  # <start> w1 .. wn <end>
        if not seqs:
            raise ValueError("no usable captions for this split")
        self.rows = torch.tensor(rows, dtype=torch.long)  # (M,)
        # int32 ids: half of int64's memory (the embedding takes them as they are, the loss casts targets)
        self.tokens, self.token_lengths = pad_captions(seqs, vocab.pad_id, torch.int32)  # (M, n_max + 2), (M,)
        # teacher-forcing views made once, so a batch is only gathered: inputs <start> w1 .. wn
        # (the <end> of each caption becomes padding), targets w1 .. wn <end>; lengths n + 1 stay
        # on the CPU (packing and the batch's padded width are read there without a device sync)
        self.lengths = self.token_lengths - 1  # (M,)
        self.inputs = self.tokens[:, :-1].masked_fill(self.tokens[:, :-1] == vocab.end_id, vocab.pad_id)
        self.targets = self.tokens[:, 1:]  # (M, n_max + 1) each

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, int):
            return int(self.rows[i]), self.tokens[i, : self.token_lengths[i]].tolist()
        return self.gather(i)

    def to(self, device: torch.device | str) -> "CaptionPairs":
        """Keep the gathered tensors on `device` (the GPU, next to the cached features); lengths stay on the CPU."""
        self.rows, self.inputs, self.targets = (t.to(device) for t in (self.rows, self.inputs, self.targets))
        return self

    def batches(self, batch_size: int, generator: torch.Generator, pool: int = 16) -> list[torch.Tensor]:
        """One epoch's batches of pair indices (each (B,), on the CPU), length-bucketed.

        The pairs are shuffled, each run of `pool` batches is sorted by caption length and cut into
        batches, and the batch order is shuffled again: every pair is seen once per epoch in a
        seeded random order, but a batch holds captions of about one length, so the LSTM runs over
        little padding (bench/stage2.py measures the gain). Depends on the generator only.
        """
        perm = torch.randperm(len(self), generator=generator)
        chunk = batch_size * pool
        out: list[torch.Tensor] = []
        for s in range(0, len(perm), chunk):
            part = perm[s:s + chunk]
            out.extend(part[torch.sort(self.lengths[part], stable=True).indices].split(batch_size))
        return [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]

    def gather(self, idx: torch.Tensor, features: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> CaptionBatch:
        """Batch of pairs `idx` (B,); features looked up by row in `features` (N, D), or in (V, N, D)
        (V views of each image) from a view drawn at random per pair with `generator`.

        Tensor indexing only, no Python loop over captions; lengths and the padded width are read
        on the CPU, so gathering from tensors on a GPU (`to`) never waits for the device. The rows are
        sorted longest caption first here, on the CPU, so packing needs no sort (and no index upload)
        on the device; each pair keeps the view it would have drawn in `idx`'s order.
        """
        # the very sort pack_padded_sequence(enforce_sorted=False) makes: the packed order, and so the loss, as before
        idx = idx.cpu()  # pair indices are made on the CPU (`batches`): a no-op there
        order = torch.sort(self.lengths[idx], descending=True).indices  # (B,)
        idx = idx[order]
        lengths = self.lengths[idx]  # (B,) non-increasing
        t = int(lengths[0]) if len(lengths) else 0  # the batch's padded width, read on the CPU
        dev_idx = idx.to(self.inputs.device, non_blocking=True)
        rows = self.rows[dev_idx]
        feats = view_rows(features, rows, generator, order) if features is not None else rows
        return CaptionBatch(feats, self.inputs[dev_idx, :t], self.targets[dev_idx, :t], lengths, order)


def view_rows(features: torch.Tensor, rows: torch.Tensor, generator: torch.Generator | None = None,
              order: torch.Tensor | None = None) -> torch.Tensor:
    """`features[rows]` from (N, D), or from (V, N, D) (V cached views of each image) with one view
    per row drawn at random with `generator` (no draw at all from (N, D)). `order` (B,): the rows
    were reordered by it, and row i gets the view drawn for position order[i] (the same draws)."""
    if features.dim() == 3:
        view = torch.randint(features.shape[0], (len(rows),), generator=generator)
        return features[upload(view if order is None else view[order], rows.device), rows]
    return features[rows]
