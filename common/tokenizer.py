"""The caption tokenizers, used for the vocabulary, training, decoding and evaluation alike.

A run's tokenizer is a recorded setting (`TrainConfig.tokenizer`, kept in the vocabulary and so in
every checkpoint): `nltk` (English and other languages written with spaces), `whitespace` (text
already split into words by spaces) and `chars` (languages written without spaces, such as Japanese
or Chinese: every character a token). `join_tokens` is its inverse for display.
"""
from __future__ import annotations

import string
import unicodedata


TOKENIZERS = ("nltk", "whitespace", "chars")
DEFAULT_TOKENIZER = "nltk"


def check_tokenizer(name: str) -> str:
    """`name` if it is a known tokenizer, else a ValueError naming the choices."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose from {', '.join(TOKENIZERS)}")
    return name


def tokenize(text: str, name: str = DEFAULT_TOKENIZER) -> list[str]:
    """Lower-case and split a caption into tokens with the named tokenizer (see the module docstring).

    Punctuation never becomes a token: it carries no content and the COCO evaluation strips it
    too, so keeping it would only teach the decoder to emit punctuation.
    """
    if name == "nltk":
        return _nltk(text)
    if name == "whitespace":
        return [t for t in (_strip_punct(w) for w in text.lower().split()) if _has_content(t)]
    check_tokenizer(name)  # raises for any name but the last one left
    return _chars(text)


def join_tokens(tokens: list[str], name: str = DEFAULT_TOKENIZER) -> str:
    """Tokens -> caption text: characters joined without spaces (`chars`), words with one space."""
    return ("" if name == "chars" else " ").join(tokens)


def _nltk(text: str) -> list[str]:
    """`preserve_line=True` skips NLTK's sentence splitter, which needs the downloaded `punkt`
    data; the captions are single sentences anyway. NLTK is imported here: decoding needs only
    `join_tokens`, so the torch-free ONNX captioner runs without it."""
    from nltk.tokenize import word_tokenize

    out = []
    for t in word_tokenize(text.lower(), preserve_line=True):
        if not (t.startswith("'") or t == "n't"):  # keep clitics ('s, 're, n't); strip glued "man." / ":a"
            t = t.strip(_PUNCT)
        if any(ch.isalnum() for ch in t):
            out.append(t)
    return out


def _chars(text: str) -> list[str]:
    """Every character that is not a space, punctuation or a symbol is a token; a combining mark
    (a Thai vowel sign, a Devanagari matra, a separate accent) stays with the character before it."""
    out: list[str] = []
    kept_last = False
    for ch in unicodedata.normalize("NFC", text.lower()):
        cat = unicodedata.category(ch)
        if cat[0] == "M":  # combining mark: part of the previous character, dropped with it
            if kept_last:
                out[-1] += ch
            continue
        kept_last = cat[0] in "LN"  # letters and digits; spaces (Z), punctuation (P), symbols (S), controls (C) go
        if kept_last:
            out.append(ch)
    return out


def _strip_punct(word: str) -> str:
    """A word without the punctuation and symbols glued to either end (any script's: "、" "」" "!")."""
    lo, hi = 0, len(word)
    while lo < hi and unicodedata.category(word[lo])[0] in "PS":
        lo += 1
    while hi > lo and unicodedata.category(word[hi - 1])[0] in "PS":
        hi -= 1
    return word[lo:hi]


def _has_content(token: str) -> bool:
    return any(ch.isalnum() for ch in token)


_PUNCT = string.punctuation + "“”‘’«»…–—"
