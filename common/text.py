"""File names and other user text made safe to print: one line, no terminal control sequences.

A file may be called `a\\nb.jpg` or carry an ESC sequence (`\\x1b[2J` clears the screen) or a bidi override
(U+202E shows `gpj.exe` as `exe.jpg`): printed raw, such a name forges log lines or rewrites the terminal.
"""
from __future__ import annotations

import os

from common.jsonio import LONE_SURROGATE


def printable(name: str | os.PathLike | bytes) -> str:
    """`name` unchanged when every character prints as itself; else its Python repr (quoted, with
    `\\n`, `\\x1b`, `\\u202e` escaped), so the reader sees that it was escaped and can tell it apart."""
    text = os.fsdecode(name) if isinstance(name, (bytes, os.PathLike)) else str(name)
    return text if text.isprintable() else repr(text)


def escape_controls(text: str) -> str:
    """`text` with each character that does not print as itself (controls, ESC, bidi overrides) written as
    its escape (`\\x1b`, `\\u202e`), the rest unchanged: for messages, which quote names of their own."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shortened(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters with "..." and the count left out, for a value quoted in a one-line
    message (a JSON file read as CSV has its whole first line as its "header")."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def surrogates_shown(text: str) -> str:
    """`text` with its lone surrogates written out: a file name's bytes that are not UTF-8 (Python holds them as
    U+DC80-U+DCFF) as \\xNN, any other as \\uXXXX. No UTF-8 output can carry them: a page or file with one
    could not be written at all."""
    if text.isascii():
        return text
    return LONE_SURROGATE.sub(lambda m: f"\\x{ord(m[0]) - 0xDC00:02x}" if "\udc80" <= m[0] <= "\udcff"
                          else f"\\u{ord(m[0]):04x}", text)
