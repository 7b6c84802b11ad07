"""The one caption tokenizer, used for the vocabulary, training and evaluation alike."""
from __future__ import annotations

from nltk.tokenize import word_tokenize


def tokenize(text: str) -> list[str]:
    """Lower-case and split a caption into word tokens.

    `preserve_line=True` skips NLTK's sentence splitter, which needs the downloaded
    `punkt` data; the captions are single sentences anyway. Tokens without a letter or
    digit (".", ",", "--") are dropped: they carry no content and the COCO evaluation
    strips them too, so keeping them would only teach the decoder to emit punctuation.
    """
    tokens = word_tokenize(text.lower(), preserve_line=True)
    return [t for t in tokens if any(ch.isalnum() for ch in t)]
