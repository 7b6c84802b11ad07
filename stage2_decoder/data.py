"""Training data from the cache: (image row, caption) pairs, pre-tokenised into padded tensors."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from common.datasets import ImageRecord
from common.tokenizer import tokenize
from common.vocab import Vocabulary


def pad_captions(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded collate: id lists -> (B, T_max) LongTensor padded with pad_id, and lengths (B,)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 0), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out, lengths


@dataclass
class CaptionBatch:
    features: torch.Tensor  # (B, D)
    inputs: torch.Tensor  # (B, T) <start> w1 .. wn, padded
    targets: torch.Tensor  # (B, T) w1 .. wn <end>, padded
    lengths: torch.Tensor  # (B,) n + 1


class CaptionPairs(Dataset):
    """Every (image row, caption) pair of a split, tokenised once into padded tensors.

    Indexing with a LongTensor of pair indices gathers a whole batch in a few tensor ops
    (no per-item Python work in the training loop); `__getitem__` with an int gives one pair.
    """

    def __init__(self, records: Sequence[ImageRecord], rows_by_key: dict[str, int], vocab: Vocabulary,
                 max_len: int = 50):
        rows, seqs = [], []
        for rec in records:
            row = rows_by_key.get(rec.key)
            if row is None:  # image skipped by stage 1 (unreadable)
                continue
            for cap in rec.captions:
                words = tokenize(cap)[: max_len]
                if not words:  # empty or punctuation-only caption teaches nothing
                    continue
                rows.append(row)
                seqs.append(vocab.encode(words))  # <start> w1 .. wn <end>
        if not seqs:
            raise ValueError("no usable captions for this split")
        self.rows = torch.tensor(rows, dtype=torch.long)  # (M,)
        self.tokens, self.token_lengths = pad_captions(seqs, vocab.pad_id)  # (M, n_max + 2), (M,)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, int):
            return int(self.rows[i]), self.tokens[i, : self.token_lengths[i]].tolist()
        return self.gather(i)

    def gather(self, idx: torch.Tensor, features: torch.Tensor | None = None) -> CaptionBatch:
        """Batch of pairs `idx` (B,); features looked up by row in `features` (N, D)."""
        lengths = self.token_lengths[idx] - 1  # inputs drop <end>, targets drop <start>
        t = int(lengths.max())
        toks = self.tokens[idx, : t + 1]
        inputs = toks[:, :-1].clone()
        inputs[inputs == 2] = 0  # <end> of the longest caption is never an input; others are padding
        return CaptionBatch(features[self.rows[idx]] if features is not None else self.rows[idx],
                            inputs, toks[:, 1:], lengths)
