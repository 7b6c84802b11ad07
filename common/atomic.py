"""The one way every output file is written: whole or not at all, never through a planted link.

`atomic_write(path, data)` and `atomic_path(path)` create a fresh temporary file in the target's
own folder with exclusive-create semantics (`tempfile.mkstemp`: O_CREAT | O_EXCL, a random name,
so a symlink or file someone placed beside the target is never opened, let alone followed),
write, flush and fsync it, then `os.replace` it over the target. A crash, a kill or a full disk
leaves the previous target (if any) untouched and no stray temporary file behind (except after
SIGKILL, when a `.NAME.*.tmp` file may stay; it is never read). The target itself, if it is a
symlink, is replaced by the new file, not written through. A target that is a device, pipe or socket
(`/dev/stdout`, `/dev/null`, a FIFO), or a link to one, is refused: replacing it would put a file where
the device was (as root, in /dev).
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import BinaryIO


class AtomicWriteError(OSError):
    """An output that could not be written; names the file."""

    def __str__(self) -> str:  # the message alone, not "[Errno 28] ...": it is shown to users as one line
        return self.strerror or super().__str__()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened or fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _not_a_file(path: Path) -> None:
    """OSError if `path` exists (followed through links) as something other than a regular file or a folder,
    or is a name in /dev or /proc (/dev/stdout links to whatever stdout is: a file there too)."""
    parent = os.path.realpath(path.parent if str(path.parent) else ".")
    if parent == "/dev" or parent == "/proc" or parent.startswith("/proc/"):
        raise OSError(errno.EINVAL, f"it is a name in {parent}, not a file of its own: name a file")
    try:
        st = os.stat(path)
    except OSError:
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise OSError(errno.EINVAL, "it is a device, pipe or socket, not a file: name a file")


def ready_to_write(path: str | os.PathLike, what: str, folder: bool = False) -> Path:
    """Make `path`'s folder (`folder`: `path` itself, a folder outputs go into) and check it can be written there,
    before the work whose result it will hold (AtomicWriteError "cannot write WHAT PATH: reason" now, not after
    an hour's work)."""
    path = Path(path)
    target = path if folder else path.parent
    try:
        if not folder and path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder")
        if not folder:
            _not_a_file(path)
        try:
            target.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise NotADirectoryError(errno.ENOTDIR, "a part of its folder's path is a file") from None
        if not os.access(target, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "its folder cannot be written to")
    except OSError as e:
        raise AtomicWriteError(e.errno, f"cannot write {what} {path}: {_why(e)}") from e
    return path


def clipped(name: str, max_bytes: int) -> str:
    """`name` cut to at most `max_bytes` in UTF-8 (whole characters; a file name's bytes that are not UTF-8 are
    left out): file names have 255 bytes at most, and a temporary beside a file adds to its name."""
    return os.fsencode(name)[:max_bytes].decode(errors="ignore")  # a name's undecodable bytes are dropped too


def _why(e: OSError) -> str:
    return e.strerror or str(e).splitlines()[0] if str(e) else type(e).__name__


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "", mode: int = 0o644,
                scratch: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a fresh, empty temporary path beside `path` for a writer that needs a file name (h5py,
    matplotlib, np.savez); when the block ends without error it is fsynced and renamed to `path`.

    `what` names the output in the error ("checkpoint", "vocabulary"): an OSError becomes one
    AtomicWriteError "cannot write WHAT PATH: reason". `scratch` puts the temporary in another
    folder of the same filesystem (a cache's work folder, cleaned with it).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tmp: Path | None = None
    try:
        _not_a_file(path)
        fd, name = tempfile.mkstemp(prefix=f".{clipped(path.name, 200)}.", suffix=".tmp", dir=scratch or folder)
        os.close(fd)
        os.chmod(name, mode)
        tmp = Path(name)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fsync(fd)  # the data on disk before the rename makes it count
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(folder)
    except OSError as e:
        if isinstance(e, AtomicWriteError):
            raise
        label = f"{what} " if what else ""
        raise AtomicWriteError(e.errno, f"cannot write {label}{path}: {_why(e)}") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], object], what: str = "",
                 mode: int = 0o644) -> Path:
    """Write `data` (bytes, text as UTF-8, or a function writing to a binary file) to `path` atomically."""
    with atomic_path(path, what, mode) as tmp:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
    return Path(path)


def remove_stale_temporaries(folder: str | os.PathLike, names: Collection[str]) -> list[Path]:
    """Delete the `.NAME.*.tmp` files a killed writer left in `folder` for each output NAME.

    Only for a folder its caller owns (holds its lock): another writer's live temporary would go too.
    A link at such a name is removed, never followed. Returns what was removed.
    """
    folder, removed = Path(folder), []
    prefixes = tuple(f".{n}." for n in names)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            if entry.name.startswith(prefixes) and entry.name.endswith(".tmp") and not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed
