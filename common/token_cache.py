"""Tokenised captions cached on disk: a training start, a sweep run or a resume reads token ids
instead of running the tokenizer over every caption again (minutes on full MS-COCO).

    python -c "from common.token_cache import cache_dir; print(cache_dir())"   # where they live

One file per (captions file content, tokenizer): `DIR/<sha256 of the captions file>-<tokenizer>-<version>.npz`,
DIR = $CAPCACHE_TOKEN_CACHE, else $XDG_CACHE_HOME/capcache/tokens, else ~/.cache/capcache/tokens.
The version is a hash of the tokenizer's source module and NLTK's version, so editing the tokenizer
invalidates every cached file by itself. Arrays (np.savez, loaded with allow_pickle=False):

    meta       str ()       JSON {"format", "captions_sha256", "tokenizer", "tokenizer_version"}
    words      str (W,)     the distinct tokens
    keys       str (K,)     image keys, in the order first tokenised
    n_caps     int32 (K,)   captions per key
    cap_chars  int32 (C,)   characters of each caption (a cheap check that the captions are the same)
    offsets    int64 (C+1,) token ranges of the captions in `ids`
    ids        int32 (T,)   token ids into `words`

A file that is unreadable, of another format, captions file or tokenizer, or whose stored captions
do not match the ones asked for, is ignored and rewritten (written atomically, common/atomic.py). A
cache folder that cannot be written only costs the tokenising.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.atomic import atomic_path

FORMAT = "capcache-tokens/1"
_CHUNK = 1 << 20


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
    """Changes whenever the tokenizer's code (its module) or NLTK changes."""
    import nltk

    from common import tokenizer

    tokenizer.check_tokenizer(name)
    source = inspect.getsource(tokenizer)
    return hashlib.sha256(f"{name}\0{nltk.__version__}\0{source}".encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def cache_file(captions_file: str | os.PathLike, tokenizer: str = "nltk") -> Path:
    return cache_dir() / f"{file_sha256(captions_file)}-{tokenizer}-{tokenizer_version(tokenizer)}.npz"


def tokenize_records(captions_file: str | os.PathLike, records: Sequence, tokenizer: str = "nltk",
                     progress: bool = False) -> dict[str, list[list[str]]]:
    """{key: one token list per caption} of `records` (loaded from `captions_file`), from the token
    cache where it holds them; the rest is tokenised and the cache file rewritten to include it."""
    meta = {"format": FORMAT, "captions_sha256": file_sha256(captions_file), "tokenizer": tokenizer,
            "tokenizer_version": tokenizer_version(tokenizer)}
    path = cache_dir() / f"{meta['captions_sha256']}-{tokenizer}-{meta['tokenizer_version']}.npz"
    stored = _read(path, meta)
    out: dict[str, list[list[str]]] = {}
    missing = []
    for r in records:
        got = stored.get(r.key)
        if got is not None and got[0] == [len(c) for c in r.captions]:
            out[r.key] = got[1]
        else:
            missing.append(r)
    if not missing:
        return out
    fn = tokenizer_fn(tokenizer)
    for r in tqdm(missing, desc="tokenising captions", unit="img", disable=not progress, leave=False):
        out[r.key] = [fn(c) for c in r.captions]
    merged = {k: v for k, v in stored.items() if k not in out}
    merged.update({r.key: ([len(c) for c in r.captions], out[r.key]) for r in records})
    _write(path, meta, merged)
    return out


def _read(path: Path, meta: dict) -> dict[str, tuple[list[int], list[list[str]]]]:
    """{key: (caption lengths, token lists)} of a valid cache file; {} for a missing, corrupt or foreign one."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["meta"])) != meta:
                return {}
            words, keys = z["words"].tolist(), z["keys"].tolist()
            n_caps, cap_chars, offsets, ids = z["n_caps"], z["cap_chars"], z["offsets"], z["ids"]
        if (len(n_caps) != len(keys) or int(n_caps.sum()) != len(cap_chars) or len(offsets) != len(cap_chars) + 1
                or offsets[0] != 0 or offsets[-1] != len(ids) or np.any(np.diff(offsets) < 0)
                or (len(ids) and (ids.min() < 0 or ids.max() >= len(words)))):
            return {}
        flat = [words[i] for i in ids.tolist()]
        off, chars = offsets.tolist(), cap_chars.tolist()
        caps = [flat[a:b] for a, b in zip(off[:-1], off[1:])]
        out, s = {}, 0
        for k, n in zip(keys, n_caps.tolist()):
            out[k] = (chars[s:s + n], caps[s:s + n])
            s += n
        return out
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError):
        return {}


def _write(path: Path, meta: dict, entries: dict[str, tuple[list[int], list[list[str]]]]) -> None:
    stoi: dict[str, int] = {}
    caps = [c for chars, tokens in entries.values() for c in tokens]
    ids = np.fromiter((stoi.setdefault(w, len(stoi)) for w in chain.from_iterable(caps)), dtype=np.int32)
    offsets = np.zeros(len(caps) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in caps], out=offsets[1:])
    arrays = dict(meta=np.array(json.dumps(meta)), words=np.array(list(stoi) or [""], dtype=str)[: len(stoi)],
                  keys=np.array(list(entries) or [""], dtype=str)[: len(entries)],
                  n_caps=np.array([len(t) for _, t in entries.values()], dtype=np.int32),
                  cap_chars=np.array([n for chars, _ in entries.values() for n in chars], dtype=np.int32),
                  offsets=offsets, ids=ids)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, "token cache") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    except OSError as e:  # a cache is a convenience: without it training only tokenises again
        print(f"warning: token cache not written ({e})", file=sys.stderr)
