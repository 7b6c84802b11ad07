"""The caption tokenizers, used for the vocabulary, training, decoding and evaluation alike.

A run's tokenizer is a recorded setting (`TrainConfig.tokenizer`, kept in the vocabulary and so in
every checkpoint): `nltk` (English and other languages written with spaces), `whitespace` (text
already split into words by spaces) and `chars` (languages written without spaces, such as Japanese
or Chinese: every character a token). `join_tokens` is its inverse for display.
"""
from __future__ import annotations

import unicodedata


TOKENIZERS = ("nltk", "whitespace", "chars")
DEFAULT_TOKENIZER = "nltk"


def check_tokenizer(name: str) -> str:
    """`name` if it is a known tokenizer, else a ValueError naming the choices."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose from {', '.join(TOKENIZERS)}")
    return name


def normalize(text: str, name: str = DEFAULT_TOKENIZER) -> str:
    """The text as the named tokenizer reads it: without invisible format characters, control characters
    as spaces (see `_visible`), lower-cased and composed (NFC: "café" typed with a separate accent is the same
    word). Every token of `tokenize(text, name)` is a substring of it, in order (the token cache checks cached
    tokens against their captions this way)."""
    return unicodedata.normalize("NFC", _visible(text).lower())


def tokenize(text: str, name: str = DEFAULT_TOKENIZER) -> list[str]:
    """Lower-case and split a caption into tokens with the named tokenizer (see the module docstring).

    Punctuation never becomes a token: it carries no content and the COCO evaluation strips it
    too, so keeping it would only teach the decoder to emit punctuation.
    """
    check_tokenizer(name)
    text = normalize(text, name)
    if name == "nltk":
        return _nltk(text)
    if name == "whitespace":
        return [t for t in (_strip_punct(w) for w in text.split()) if _has_content(t)]
    return _chars(text)


_JOINERS = "\u200c\u200d"  # zero-width (non-)joiner: part of the spelling of Persian and Indic words


def _visible(text: str) -> str:
    """The text without invisible format characters (Unicode category Cf: the bidi controls U+202A-202E,
    U+2066-2069, U+200E/F that reorder what a terminal shows, zero-width spaces, soft hyphens, BOMs; the
    joiners stay) and with control characters (Cc: ESC, tabs, newlines) as spaces, so that no word of a
    vocabulary hides them: `dog` and `do\\u202eg` are one word, and a decoded caption never drives a terminal."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(" " if (cat := unicodedata.category(ch)) == "Cc" else "" if cat == "Cf" and ch not in _JOINERS
                   else ch for ch in text)


def could_be_token(word: str) -> bool:
    """Whether a tokenizer could have made `word`: not empty, no spaces, line breaks or control characters (a
    tampered vocabulary's word could otherwise forge output lines or drive a terminal). Invisible format
    characters pass: tokenizers before `_visible` kept them inside words (a Persian word's RLM), and checkpoints
    of those are still read."""
    return bool(word) and not any(ch.isspace() or unicodedata.category(ch) == "Cc" for ch in word)


def join_tokens(tokens: list[str], name: str = DEFAULT_TOKENIZER) -> str:
    """Tokens -> caption text: characters joined without spaces (`chars`), words with one space."""
    return ("" if name == "chars" else " ").join(tokens)


def _nltk(text: str) -> list[str]:
    """Tokens of normalised (lower-cased) text. `preserve_line=True` skips NLTK's sentence splitter, which
    needs the downloaded `punkt` data; the captions are single sentences anyway. NLTK is imported here:
    decoding needs only `join_tokens`, so the torch-free ONNX captioner runs without it."""
    from nltk.tokenize import word_tokenize

    out = []
    for t in word_tokenize(text, preserve_line=True):
        if not (t.startswith("'") or t == "n't"):  # keep clitics ('s, 're, n't); strip glued "man." / "¿qué"
            t = _strip_punct(t)
        if any(ch.isalnum() for ch in t):
            out.append(t)
    return out


def _chars(text: str) -> list[str]:
    """Tokens of normalised text. Every character that is not a space, punctuation or a
    symbol is a token; a combining mark (a Thai vowel sign, a Devanagari matra, a separate accent) stays with
    the character before it."""
    out: list[str] = []
    kept_last = False
    for ch in text:
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

