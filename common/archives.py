"""Unpacking a downloaded archive safely: zip or tar, members confined to the destination folder, files moved
into place one by one so an interrupted run leaves no half-written file, a damaged member one error."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

CHUNK = 1 << 20
# the most an archive's files may hold per byte of the archive: the real ones are JPEGs (about 1x) and
# JSON captions (about 5x); a zip bomb declares thousands of times its size
MAX_RATIO = 100
RATIO_SLACK = 64 * 2**20
# what download_dataset writes into a dataset's folder: an archive's member of these names is skipped
RESERVED = (".extracted.json", ".extracting-")
# errors of the archive's layout (a file and a folder of one name, in a fresh folder): the archive's fault
_LAYOUT_ERRNOS = {errno.EEXIST, errno.EISDIR, errno.ENOTDIR}
_NO_ROOM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DownloadError(OSError):
    """An archive that cannot be fetched, verified or extracted; the message says what to do."""


class ArchiveDamaged(DownloadError):
    """An archive whose contents cannot be unpacked (a damaged member), though its size or checksum passed."""


def _safe_name(name: str, archive: Path) -> PurePosixPath | None:
    """The member's relative path; None for macOS resource-fork litter; an error for paths leaving the folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    if not p.parts or p.parts[0] == "__MACOSX" or p.name.startswith("._") or p.name == ".DS_Store":
        return None  # "." or "" names the folder itself
    if p.is_absolute() or ".." in p.parts:
        raise DownloadError(f"{archive} holds a file outside its folder ({name!r}); refusing to extract it")
    return p


def extract_archive(path: Path, dest: Path, members: tuple[str, ...] = (), into: str = ".",
                    progress: bool = True) -> int:
    """Unpack a zip or tar archive into dest/into (only `members`, flattened, if given); returns files written.

    Files go to a temporary folder inside dest first and are then moved into place one by one,
    so two archives can fill the same folder and an interrupted run leaves no half-written file.
    """
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".extracting-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    target = tmp / into
    target.mkdir(parents=True)
    wanted = set(members)
    found: set[str] = set()

    def out_path(name: str) -> Path | None:
        rel = _safe_name(name, path)
        if rel is None or (wanted and rel.name not in wanted):
            return None
        rel = PurePosixPath(rel.name) if wanted else rel
        top = (PurePosixPath(into) / rel).parts[0]
        if top.startswith(RESERVED):  # would overwrite the record of what is extracted: never an archive's
            return None
        found.add(rel.name)
        return target / rel

    try:
        try:
            _unpack(path, out_path, progress, MAX_RATIO * path.stat().st_size + RATIO_SLACK)
        except (zlib.error, zipfile.BadZipFile, tarfile.TarError, EOFError) as e:  # a damaged member
            raise ArchiveDamaged(f"{path} is damaged ({type(e).__name__}: {_reason(e)})") from None
        except (NotImplementedError, RuntimeError) as e:  # zipfile: Deflate64, an encrypted member
            raise ArchiveDamaged(f"{path} cannot be unpacked here ({_reason(e)})") from None
        except DownloadError:
            raise
        except OSError as e:  # in a fresh temp folder: a clash is between the archive's own members
            if e.errno in _LAYOUT_ERRNOS:
                raise ArchiveDamaged(f"{path} cannot be unpacked: {e.strerror or _reason(e)} for "
                                     f"{_member(e, tmp, dest)}") from None
            raise _disk_error(e, path, tmp, dest) from None
        if wanted - found:
            raise DownloadError(f"{path} does not hold {', '.join(sorted(wanted - found))}")
        n = 0
        for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
            dst = dest / src.relative_to(tmp)
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
            except OSError as e:  # something already in the dataset's folder is in the way: not the archive's fault
                raise _disk_error(e, path, tmp, dest) from None
            n += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # what was moved into place stays; the rest goes
    return n


def _disk_error(e: OSError, path: Path, tmp: Path, dest: Path) -> DownloadError:
    """An OSError of the disk or of what is already in `dest` (the archive is kept: it is not at fault)."""
    if e.errno in _NO_ROOM_ERRNOS:
        return DownloadError(f"no room to extract {path} into {dest} ({e.strerror}); free some space and run again")
    return DownloadError(f"cannot extract {_member(e, tmp, dest)} of {path} into {dest}: {e.strerror or _reason(e)}; "
                         f"move what is in the way aside and run again")


def _member(e: OSError, tmp: Path, dest: Path) -> str:
    """The archive member an OSError is about (its path inside the archive's folder)."""
    for name in (e.filename, e.filename2):
        if name:
            for base in (tmp, dest):
                with contextlib.suppress(ValueError):
                    return repr(str(Path(name).relative_to(base)))
    return "one of its members"


def _reason(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _unpack(path: Path, out_path, progress: bool, max_bytes: int) -> None:
    """Each wanted member of a zip or tar archive to `out_path(name)`; ArchiveDamaged once the members written
    would hold more than `max_bytes` (each member is read up to its declared size, so counting those is enough)."""
    written = 0

    def take(size: int) -> None:
        nonlocal written
        written += size
        if written > max_bytes:
            raise ArchiveDamaged(f"{path} unpacks to more than {max_bytes:,} bytes, over {MAX_RATIO}x its own size: "
                                 f"not a dataset archive (a zip bomb?)")

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            infos = [(i, out_path(i.filename)) for i in zf.infolist() if not i.is_dir()]
            infos = [(i, out) for i, out in infos if out is not None]
            take(sum(i.file_size for i, _ in infos))  # all declared up front: refused before a byte is written
            for info, out in tqdm(infos, desc=f"extract {path.name}", unit="file", disable=not progress, leave=False):
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as tf:
            for info in tqdm(tf, desc=f"extract {path.name}", unit="file", disable=not progress, leave=False):
                out = out_path(info.name) if info.isfile() else None  # links and devices are never needed
                if out is not None:
                    take(info.size)  # a compressed tar declares each size only as it comes
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with tf.extractfile(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
    else:  # a download cut short (a server that sent no length) ends here too
        raise ArchiveDamaged(f"{path} is neither a zip nor a tar archive (cut short?)")
