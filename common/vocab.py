"""Word <-> index vocabulary, stored as JSON (never pickled)."""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence

from common.atomic import atomic_write
from common.jsonio import JSONFileError, read_json
from common.tokenizer import DEFAULT_TOKENIZER, TOKENIZERS, could_be_token, join_tokens

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # indices 0, 1, 2, 3: <pad> must be 0 (padding_idx)
VOCAB_FORMAT = "capcache-vocab/1"


class VocabError(ValueError):
    """A vocabulary file or dict that cannot be used."""


class Vocabulary:
    def __init__(self, words: Sequence[str], threshold: int | None = None, tokenizer: str = DEFAULT_TOKENIZER):
        words = list(words)
        if not all(isinstance(w, str) for w in words):
            raise VocabError("vocabulary words must all be strings")
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise VocabError(f"vocabulary must start with {SPECIALS}, got {words[:4]}")
        if len(set(words)) != len(words):
            raise VocabError("vocabulary has duplicate words")
        if bad := [w for w in words if not could_be_token(w)]:
            raise VocabError(f"vocabulary has {len(bad)} words no tokenizer makes (empty, or with spaces, line breaks "
                             f"or control characters), such as {ascii(bad[0])[:60]}")
        self.itos: list[str] = words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(words)}
        self.threshold = threshold
        if tokenizer not in TOKENIZERS:
            raise VocabError(f"unknown tokenizer {tokenizer!r} (known: {', '.join(TOKENIZERS)})")
        self.tokenizer = tokenizer  # the one that split the captions (common.tokenizer): decoding joins as it splits

    pad_id = 0
    start_id = 1
    end_id = 2
    unk_id = 3

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos and self.tokenizer == other.tokenizer

    def encode(self, tokens: Iterable[str], add_specials: bool = True) -> list[int]:
        """Tokens -> ids, wrapped in <start> ... <end> by default; unknown words -> <unk>."""
        ids = [self.stoi.get(t, self.unk_id) for t in tokens]
        return [self.start_id, *ids, self.end_id] if add_specials else ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> words, stopping at <end> and skipping <start>/<pad>."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            out.append(self.itos[i])
        return out

    def caption(self, ids: Iterable[int]) -> str:
        """Ids -> the caption text, joined as the tokenizer splits it (`chars`: no spaces)."""
        return join_tokens(self.decode(ids), self.tokenizer)

    def to_dict(self) -> dict:
        return {"format": VOCAB_FORMAT, "threshold": self.threshold, "tokenizer": self.tokenizer,
                "words": list(self.itos)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        if not isinstance(d, dict) or d.get("format") != VOCAB_FORMAT or not isinstance(d.get("words"), list):
            raise VocabError(f"not a {VOCAB_FORMAT} vocabulary")
        if not all(isinstance(w, str) for w in d["words"]):
            raise VocabError("vocabulary words must all be strings")
        return cls(d["words"], d.get("threshold"), d.get("tokenizer", "nltk"))  # absent: a file from before the setting

    def save(self, path: str | os.PathLike) -> None:
        # UTF-8 whatever the locale: the words may be any script (and emoji)
        atomic_write(path, json.dumps(self.to_dict(), ensure_ascii=False), what="vocabulary")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        try:  # bounded in size and depth, a regular file only (common/jsonio.py)
            return cls.from_dict(read_json(path, "vocabulary", expect=dict, max_bytes=64 * 2**20))
        except JSONFileError as e:
            raise VocabError(str(e)) from e
        except (OSError, ValueError) as e:  # ValueError: VocabError
            raise VocabError(f"cannot read vocabulary {path}: {e}") from e


def build_vocab(tokenized: Iterable[Sequence[str]], threshold: int = 4,
                tokenizer: str = DEFAULT_TOKENIZER) -> Vocabulary:
    """Vocabulary of words seen at least `threshold` times, most frequent first.

    Pass the *training split's* captions only, so validation/test words stay unseen.
    Ties are broken alphabetically so the result never depends on input order. `tokenizer` names
    the tokenizer that made `tokenized`; the vocabulary records it.
    """
    counts = Counter(t for toks in tokenized for t in toks)
    kept = sorted((w for w, c in counts.items() if c >= threshold and w not in SPECIALS),
                  key=lambda w: (-counts[w], w))
    return Vocabulary([*SPECIALS, *kept], threshold, tokenizer)
