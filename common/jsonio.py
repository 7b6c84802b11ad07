"""One bounded reader for every JSON and JSON-lines file the project reads (and `dump_json`, JSON that strict
parsers read back).

A user's file may be a FIFO (opening it blocks forever), a few GB (read whole it exhausts memory), nested
100,000 levels deep (the parser's recursion overflows) or of the wrong shape (a list where an object is
expected ends in AttributeError far away). Each of these is one `JSONFileError` naming the file here.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Iterator

MAX_BYTES = 256 * 2**20  # the largest JSON the project reads is a full-COCO captions file (~90 MB)
MAX_LINE_BYTES = 1 * 2**20  # one JSON-lines row: a caption record, a metrics line
MAX_DEPTH = 32  # deeper than any file the project writes or reads (COCO's is 4)
# how Python holds a file name's bytes that are not UTF-8 (here, not in common.text: the torch-free ONNX
# captioner ships this module alone, docs/deploy.md)
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONFileError(ValueError):
    """A JSON file that cannot be read as the caller expects; the message names the file."""


def open_regular(path: str | os.PathLike, what: str) -> int:
    """Open `path` read-only without blocking and return its descriptor, refusing anything but a regular
    file (a FIFO or device would hang or never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise JSONFileError(f"{what} {path} is a directory, not a file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise JSONFileError(f"{what} {path} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: str | os.PathLike, what: str, max_bytes: int = MAX_BYTES) -> bytes:
    """A regular file's bytes, refusing it past `max_bytes` before reading it whole."""
    fd = open_regular(path, what)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise JSONFileError(f"{what} {path} is larger than {max_bytes:,} bytes")
    return data


def _depth_ok(obj: object, max_depth: int) -> bool:
    """Whether `obj` nests no deeper than `max_depth` (iterative: the check must not recurse itself)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


def _unique_keys(what: str):
    """An object_pairs_hook refusing an object that names a key twice (json keeps the last one silently)."""
    def hook(pairs: list[tuple[str, object]]) -> dict:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise JSONFileError(f"{what} names the key {dup!r} twice in one object")
        return out
    return hook


def parse_json(text: str | bytes, what: str, expect: type | tuple[type, ...] | None = None,
               max_depth: int = MAX_DEPTH, reject_duplicate_keys: bool = False) -> object:
    """Parse one JSON document, with the depth and the top-level type checked; errors name `what`.
    With `reject_duplicate_keys` an object naming a key twice is an error (a hand-written file's typo)."""
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys(what) if reject_duplicate_keys else None)
    except JSONFileError:  # a duplicate key: the hook's own message
        raise
    except RecursionError:
        raise JSONFileError(f"{what} is nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError as e:
        raise JSONFileError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # json.JSONDecodeError, and the int-digits limit of huge numbers
        raise JSONFileError(f"{what} is not valid JSON ({e})") from None
    if not _depth_ok(obj, max_depth):
        raise JSONFileError(f"{what} is nested deeper than {max_depth} levels")
    if expect is not None and not isinstance(obj, expect):
        names = " or ".join(_type_name(t) for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise JSONFileError(f"{what} must be a JSON {names}, not {_type_name(type(obj))}")
    return obj


def read_json(path: str | os.PathLike, what: str = "JSON file", expect: type | tuple[type, ...] | None = None,
              max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH, reject_duplicate_keys: bool = False) -> object:
    """Read one JSON file (a UTF-8 BOM is allowed), bounded in size and depth, of the `expect`ed type
    (`reject_duplicate_keys`: as parse_json)."""
    data = read_bytes(path, what, max_bytes)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return parse_json(data, f"{what} {path}", expect, max_depth, reject_duplicate_keys)


def iter_jsonl(path: str | os.PathLike, what: str = "JSON-lines file", expect: type | tuple[type, ...] | None = dict,
               max_bytes: int = MAX_BYTES, max_line_bytes: int = MAX_LINE_BYTES,
               max_depth: int = MAX_DEPTH, skip_bad: bool = False) -> Iterator[tuple[int, object]]:
    """Yield (line number, row) for each non-blank line of a JSON-lines file. With `skip_bad` a bad row
    (a torn last line of a log a crash cut short) is skipped instead of raising."""
    fd = open_regular(path, what)
    total = 0
    with os.fdopen(fd, "rb") as f:
        for lineno, line in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), start=1):
            total += len(line)
            if total > max_bytes:
                raise JSONFileError(f"{what} {path} is larger than {max_bytes:,} bytes")
            if len(line) > max_line_bytes:
                if skip_bad:
                    f.readline()  # the rest of that line is not a row of its own; read past it
                    continue
                raise JSONFileError(f"{what} {path}, line {lineno}: longer than {max_line_bytes:,} bytes")
            if not line.strip():
                continue
            try:
                row = parse_json(line, f"{what} {path}, line {lineno},", expect, max_depth)
            except JSONFileError:
                if skip_bad:
                    continue
                raise
            yield lineno, row


def _type_name(t: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number",
            bool: "true/false", type(None): "null"}.get(t, t.__name__)


def finite_number(v) -> float | None:
    """`v` as a float if it is a finite number (not a bool, NaN, inf or an integer no float holds: a hand-edited
    file's 401 digits), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        v = float(v)
    except OverflowError:
        return None
    return v if math.isfinite(v) else None


def _plain(obj):
    """`obj` with its non-finite floats as None (JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def dump_json(obj, **kw) -> str:
    """JSON text in valid UTF-8 with no NaN or Infinity (as null); a file name's bytes that are not UTF-8 (held
    as lone surrogates, which no UTF-8 output can carry) as \\u escapes, which Python's json reads back to the
    same name (some parsers refuse them); other text as it is."""
    text = json.dumps(_plain(obj), ensure_ascii=False, allow_nan=False, **kw)
    return LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
