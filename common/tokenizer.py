"""The one caption tokenizer, used for the vocabulary, training and evaluation alike."""
from __future__ import annotations

import string

from nltk.tokenize import word_tokenize


def tokenize(text: str) -> list[str]:
    """Lower-case and split a caption into word tokens.

    `preserve_line=True` skips NLTK's sentence splitter, which needs the downloaded
    `punkt` data; the captions are single sentences anyway. Tokens without a letter or
    digit (".", ",", "--") are dropped: they carry no content and the COCO evaluation
    strips them too, so keeping them would only teach the decoder to emit punctuation.
    """
    out = []
    for t in word_tokenize(text.lower(), preserve_line=True):
        if not (t.startswith("'") or t == "n't"):  # keep clitics ('s, 're, n't); strip glued "man." / ":a"
            t = t.strip(_PUNCT)
        if any(ch.isalnum() for ch in t):
            out.append(t)
    return out


_PUNCT = string.punctuation + "“”‘’«»…–—"
