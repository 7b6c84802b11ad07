"""One owner per output: an OS lock on a run folder, a sweep folder, a cache in progress or an ONNX folder.

`hold(lock_file, what)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `lock_file` (created if needed, never
through a link, never truncated on opening) and writes the holder's pid in it. A lock file that is not a
regular file of one link (a FIFO, a hard link to some other file, whose content the pid would overwrite) is
refused with one `LockFileError` naming it, before anything is written. A second process gets one `OutputBusy`
line naming that pid. The kernel releases the lock when the holder dies, however it dies (a SIGKILL leaves the
file behind, unlocked: the next owner simply takes it). The file is never deleted: deleting it would let two
processes lock two different files of the same name. `hold_folder(folder, what)` locks the folder's own
descriptor instead, for an output shipped as it is (an ONNX folder), which must not carry a lock file.

A forked child does not keep its parent's locks: the inherited descriptors are closed in the
child (closing, unlike unlocking, leaves the parent's lock in place), so a child outliving its
parent cannot block the re-run, and a child's own release cannot free the parent's folder. (Until the
child has first been scheduled, its copy still counts: a release in that instant waits for it.)
"""
from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: no locking there, as before
    fcntl = None

LOCK_NAME = ".lock"
_held: set[int] = set()  # descriptors of the locks this process holds (closed in forked children)
_held_files: set[tuple[int, int, int]] = set()  # (st_dev, st_ino, thread) of those lock files


class OutputBusy(OSError):
    """Another live process owns this output."""


class LockFileError(ValueError):
    """A lock file that cannot be used as one (not a regular file, or another file's hard link)."""


def _close_inherited() -> None:
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()
    _held_files.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


def holder(lock_file: str | os.PathLike) -> str:
    """The pid written in `lock_file` ("unknown" when it cannot be read)."""
    with contextlib.suppress(OSError, ValueError):
        fd = os.open(lock_file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        try:
            text = os.read(fd, 64).decode("ascii").strip()
        finally:
            os.close(fd)
        if text.isdigit():
            return text
    return "unknown"


@contextlib.contextmanager
def hold(lock_file: str | os.PathLike, what: str, wait: float = 0, reenter: bool = False) -> Iterator[Path]:
    """Hold the lock on `lock_file` for the block; `what` names the output in the busy message. `wait`: seconds
    to wait for the holder to let go first (for writers whose turns take seconds, such as two drawings of one
    figure; a holder stopped with Ctrl-Z must not hang the waiter for ever). `reenter`: a lock this thread holds
    already is held again, as it is (a sweep's run holds its folder before it writes there, then train() in it
    takes the same lock); otherwise a second hold is refused like another process's."""
    lock_file = Path(lock_file)
    if fcntl is None:
        yield lock_file
        return
    try:  # no O_TRUNC: the file is checked first; O_NONBLOCK: a FIFO must not block the open
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0),
                     0o644)
    except OSError as e:
        raise OSError(e.errno, f"cannot lock {what} {lock_file.parent}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LockFileError(f"cannot lock {what} {lock_file.parent}: its lock file {lock_file} is not a regular "
                                f"file (a FIFO, device or socket); remove it and run again")
        if st.st_nlink != 1:
            raise LockFileError(f"cannot lock {what} {lock_file.parent}: its lock file {lock_file} has {st.st_nlink} "
                                f"hard links (it is another file's name too, which locking would overwrite); "
                                f"remove it and run again")
        ident = (st.st_dev, st.st_ino, threading.get_ident())
        if reenter and ident in _held_files:  # ours already: the outer holder lets go
            yield lock_file
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
            raise OutputBusy(f"{what} {lock_file.parent} is in use by process {holder(lock_file)} (lock "
                             f"{lock_file}); wait for it to finish or stop it, or use another folder") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:  # a full disk: said with the file, like a failed open
            raise OSError(e.errno, f"cannot lock {what} {lock_file.parent}: {e.strerror}") from e
        _held.add(fd)
        _held_files.add(ident)
        try:
            yield lock_file
        finally:
            _held_files.discard(ident)
    finally:
        _held.discard(fd)
        os.close(fd)  # releases the lock (the last descriptor of this open file); a nested hold's: nothing


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the lock on `folder` itself (flock on its descriptor) for the block: no lock file inside it, for an
    output whose files are shipped as they are. The busy message cannot name the holder."""
    folder = Path(folder)
    if fcntl is None:
        yield folder
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise OSError(e.errno, f"cannot lock {what} {folder}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusy(f"{what} {folder} is in use by another process; wait for it to finish or stop it, "
                             f"or use another folder") from None
        except OSError as e:  # NFS emulates flock with byte-range locks, which a folder opened to read cannot take
            warnings.warn(f"cannot lock {what} {folder} ({e.strerror}): a second writer meanwhile would not be "
                          f"stopped", stacklevel=3)
        else:
            _held.add(fd)
        yield folder
    finally:
        _held.discard(fd)
        os.close(fd)
