"""Tokenised captions cached on disk: a training start, a sweep run or a resume reads token ids
instead of running the tokenizer over every caption again (minutes on full MS-COCO).

    python -c "from common.token_cache import cache_dir; print(cache_dir())"   # where they live

One file per (captions file content, tokenizer): `DIR/<sha256 of the captions file>-<tokenizer>-<version>.npz`,
DIR = $CAPCACHE_TOKEN_CACHE, else $XDG_CACHE_HOME/capcache/tokens, else ~/.cache/capcache/tokens.
The version hashes everything that makes the tokens: the tokenizer's name and its source module, this
module's source, NLTK's version, Python's version and its Unicode database (`unicodedata.unidata_version`:
lower-casing, NFC and the character classes depend on it). Editing any of them invalidates every cached
file by itself. Arrays (np.savez, read back member by member, never with pickles):

    meta       str ()       JSON {"format", "captions_sha256", "tokenizer", "tokenizer_version"}
    words      str ()       JSON list of the distinct tokens
    keys       str ()       JSON list of the image keys, in the order first tokenised
    digests    uint8 (K,16) per key, a hash of its caption texts (`captions_digest`)
    n_caps     int32 (K,)   captions per key
    offsets    int64 (C+1,) token ranges of the captions in `ids`
    ids        int32 (T,)   token ids into `words`

An image's cached tokens are used only if its digest matches the captions asked for and every token
occurs, in order, in its caption's normalised text (`common.tokenizer.normalize`): a file that says the
right name but holds other words is not believed. A file that is unreadable, of another format, declares
more bytes than its captions file could produce (checked from the zip directory and each array's header
before anything is inflated), or is otherwise damaged is treated as absent: one warning, the captions are
tokenised again and the file rewritten (atomically, common/atomic.py). A cache folder that cannot be
written only costs the tokenising.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import sys
import unicodedata
import zipfile
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.atomic import atomic_path
from common.jsonio import JSONFileError, open_regular, parse_json
from common.text import printable
from common.tokenizer import normalize

FORMAT = "capcache-tokens/2"
_CHUNK = 1 << 20
DIGEST_BYTES = 16
# what one captions file can produce: tokens and captions are at most one per character, and the JSON word
# and key lists at most a few bytes per character; more than this is a damaged or planted file
BYTES_PER_CAPTIONS_BYTE = 32
SLACK_BYTES = 1 << 20
_MEMBERS = {"meta": ("U", 0), "words": ("U", 0), "keys": ("U", 0), "digests": ("u1", 2), "n_caps": ("i4", 1),
            "offsets": ("i8", 1), "ids": ("i4", 1)}  # name -> (dtype kind/code, number of dimensions)

Entry = tuple[bytes, list[list[str]]]  # (digest of the captions, one token list per caption)


class TokenCacheError(ValueError):
    """A token cache file that cannot be used (it is then ignored and rewritten)."""


def cache_dir() -> Path:
    if os.environ.get("CAPCACHE_TOKEN_CACHE"):
        return Path(os.environ["CAPCACHE_TOKEN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "capcache" / "tokens"


def tokenizer_fn(name: str) -> Callable[[str], list[str]]:
    """The tokenizer called `name` (common/tokenizer.py: nltk, whitespace, chars), looked up when called."""
    from common import tokenizer

    tokenizer.check_tokenizer(name)
    return lambda text: tokenizer.tokenize(text, name)


def tokenizer_version(name: str) -> str:
    """Changes whenever anything that makes the tokens changes: the tokenizer's code (its module), this
    module's code, NLTK, Python or its Unicode database."""
    import nltk

    from common import tokenizer

    tokenizer.check_tokenizer(name)
    parts = [name, nltk.__version__, platform.python_version(), unicodedata.unidata_version,
             inspect.getsource(tokenizer), inspect.getsource(sys.modules[__name__])]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with os.fdopen(open_regular(path, "captions file"), "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def cache_file(captions_file: str | os.PathLike, tokenizer: str = "nltk") -> Path:
    return cache_dir() / f"{file_sha256(captions_file)}-{tokenizer}-{tokenizer_version(tokenizer)}.npz"


def captions_digest(captions: Sequence[str]) -> bytes:
    """A hash of an image's caption texts, in order (each length-prefixed: no two lists share one)."""
    h = hashlib.sha256(len(captions).to_bytes(8, "little"))
    for c in captions:
        b = c.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.digest()[:DIGEST_BYTES]


def tokens_fit(tokens: list[list[str]], captions: Sequence[str], tokenizer: str) -> bool:
    """Whether each caption's tokens occur, in order and without overlapping, in its normalised text: what
    `tokenize` always gives, and what tokens of other words do not."""
    if len(tokens) != len(captions):
        return False
    for toks, caption in zip(tokens, captions):
        text, at = normalize(caption, tokenizer), 0
        for t in toks:
            found = text.find(t, at) if t else -1
            if found < 0:
                return False
            at = found + len(t)
    return True


def tokenize_records(captions_file: str | os.PathLike, records: Sequence, tokenizer: str = "nltk",
                     progress: bool = False) -> dict[str, list[list[str]]]:
    """{key: one token list per caption} of `records` (loaded from `captions_file`), from the token
    cache where it holds them; the rest is tokenised and the cache file rewritten to include it."""
    meta = {"format": FORMAT, "captions_sha256": file_sha256(captions_file), "tokenizer": tokenizer,
            "tokenizer_version": tokenizer_version(tokenizer)}
    path = cache_dir() / f"{meta['captions_sha256']}-{tokenizer}-{meta['tokenizer_version']}.npz"
    try:
        stored = _read(path, meta, _budget(captions_file))
    except TokenCacheError as e:
        print(f"warning: token cache {printable(path)} ignored ({e}): tokenising again", file=sys.stderr)
        stored = {}
    out: dict[str, list[list[str]]] = {}
    digests: dict[str, bytes] = {}
    missing, suspect = [], []
    for r in records:
        digests[r.key] = captions_digest(r.captions)
        got = stored.get(r.key)
        if got is None or got[0] != digests[r.key]:  # another caption text (or none cached): tokenise it
            missing.append(r)
        elif not tokens_fit(got[1], r.captions, tokenizer):
            suspect.append(r)
        else:
            out[r.key] = got[1]
    fn = tokenizer_fn(tokenizer)
    planted = 0
    for r in suspect:  # the check is exact for `tokenize`; tokens it refuses are re-made and compared
        out[r.key] = [fn(c) for c in r.captions]
        planted += out[r.key] != stored[r.key][1]
    if planted:
        print(f"warning: token cache {printable(path)}: {planted} images' cached tokens do not match their "
              f"captions: tokenised again", file=sys.stderr)
    if not missing and not planted:
        return out
    for r in tqdm(missing, desc="tokenising captions", unit="img", disable=not progress, leave=False):
        out[r.key] = [fn(c) for c in r.captions]
    merged = {k: v for k, v in stored.items() if k not in out}
    merged.update({r.key: (digests[r.key], out[r.key]) for r in records})
    _write(path, meta, merged)
    return out


def _budget(captions_file: str | os.PathLike) -> int:
    return BYTES_PER_CAPTIONS_BYTE * os.stat(captions_file).st_size + SLACK_BYTES


def _read(path: Path, meta: dict, budget: int) -> dict[str, Entry]:
    """{key: (digest, token lists)} of a valid cache file; {} for a missing one; TokenCacheError for one
    that is damaged, foreign or larger than `budget` bytes once inflated."""
    try:
        arrays = _load_members(path, budget)
    except FileNotFoundError:
        return {}
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, MemoryError) as e:  # zlib.error is caught inside
        raise TokenCacheError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    try:
        stored_meta = parse_json(str(arrays["meta"]), "its meta", dict)
        words = parse_json(str(arrays["words"]), "its word list", list)
        keys = parse_json(str(arrays["keys"]), "its key list", list)
    except JSONFileError as e:
        raise TokenCacheError(str(e)) from None
    if stored_meta != meta:
        raise TokenCacheError("made for other captions or another tokenizer")
    digests, n_caps, offsets, ids = arrays["digests"], arrays["n_caps"], arrays["offsets"], arrays["ids"]
    if (not all(isinstance(w, str) for w in words) or not all(isinstance(k, str) for k in keys)
            or len(set(keys)) != len(keys) or digests.shape != (len(keys), DIGEST_BYTES) or len(n_caps) != len(keys)
            or (len(n_caps) and n_caps.min() < 0) or int(n_caps.sum()) + 1 != len(offsets) or offsets[0] != 0
            or offsets[-1] != len(ids) or np.any(np.diff(offsets) < 0)
            or (len(ids) and (ids.min() < 0 or ids.max() >= len(words)))):
        raise TokenCacheError("its arrays do not fit together")
    flat = [words[i] for i in ids.tolist()]
    off = offsets.tolist()
    caps = [flat[a:b] for a, b in zip(off[:-1], off[1:])]
    out, s = {}, 0
    for k, d, n in zip(keys, digests, n_caps.tolist()):
        out[k] = (d.tobytes(), caps[s:s + n])
        s += n
    return out


def _load_members(path: Path, budget: int) -> dict[str, np.ndarray]:
    """The arrays of an .npz, each checked before it is inflated: the zip's declared sizes against `budget`,
    each array's header (dtype, rank, shape) against its declared size; reading stops at the declared size."""
    import zlib

    with os.fdopen(open_regular(path, "token cache"), "rb") as raw, zipfile.ZipFile(raw) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        if sorted(infos) != sorted(f"{n}.npy" for n in _MEMBERS):
            raise ValueError(f"holds {', '.join(sorted(map(printable, infos))) or 'nothing'}, not the token arrays")
        declared = sum(i.file_size for i in infos.values())
        if declared > budget:
            raise ValueError(f"declares {declared:,} bytes of arrays; its captions file can make at most {budget:,}")
        out = {}
        for name, (dtype, ndim) in _MEMBERS.items():
            info = infos[f"{name}.npy"]
            try:
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in ((1, 0), (2, 0)):
                        raise ValueError(f"{name}: .npy version {version}")
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                        else np.lib.format.read_array_header_2_0
                    shape, fortran, dt = read_header(f)
                    if dt.hasobject or len(shape) != ndim or (dt.kind if dtype == "U" else dt.str[1:]) != dtype:
                        raise ValueError(f"{name}: {dt} of {len(shape)} dimensions, not {dtype} of {ndim}")
                    nbytes = int(np.prod(shape, dtype=object)) * dt.itemsize
                    if nbytes > info.file_size:
                        raise ValueError(f"{name}: its header declares {nbytes:,} bytes, the zip {info.file_size:,}")
                    data = f.read(nbytes)
            except zlib.error as e:
                raise ValueError(f"{name}: {e}") from None
            if len(data) != nbytes:
                raise ValueError(f"{name}: {len(data):,} of {nbytes:,} bytes")
            out[name] = np.frombuffer(data, dtype=dt).reshape(shape, order="F" if fortran else "C")
        return out


def _write(path: Path, meta: dict, entries: dict[str, Entry]) -> None:
    stoi: dict[str, int] = {}
    caps = [c for _, tokens in entries.values() for c in tokens]
    ids = np.fromiter((stoi.setdefault(w, len(stoi)) for w in chain.from_iterable(caps)), dtype=np.int32)
    offsets = np.zeros(len(caps) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in caps], out=offsets[1:])
    digests = np.frombuffer(b"".join(d for d, _ in entries.values()), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    arrays = dict(meta=np.array(json.dumps(meta)), words=np.array(json.dumps(list(stoi), ensure_ascii=False)),
                  keys=np.array(json.dumps(list(entries), ensure_ascii=False)), digests=digests,
                  n_caps=np.array([len(t) for _, t in entries.values()], dtype=np.int32), offsets=offsets, ids=ids)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, "token cache") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    except OSError as e:  # a cache is a convenience: without it training only tokenises again
        print(f"warning: token cache not written ({e})", file=sys.stderr)
