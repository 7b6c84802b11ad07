"""Unpacking a downloaded archive safely: zip or tar, members confined to the destination folder, files moved
into place one by one so an interrupted run leaves no half-written file, a damaged member one error."""
from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

CHUNK = 1 << 20


class DownloadError(OSError):
    """An archive that cannot be fetched, verified or extracted; the message says what to do."""


class ArchiveDamaged(DownloadError):
    """An archive whose contents cannot be unpacked (a damaged member), though its size or checksum passed."""


def _safe_name(name: str, archive: Path) -> PurePosixPath | None:
    """The member's relative path; None for macOS resource-fork litter; an error for paths leaving the folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.parts and (p.parts[0] == "__MACOSX" or p.name.startswith("._") or p.name == ".DS_Store"):
        return None
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
        found.add(rel.name)
        return target / (rel.name if wanted else rel)

    try:
        _unpack(path, out_path, progress)
    except (zlib.error, zipfile.BadZipFile, tarfile.TarError, EOFError) as e:  # a damaged member: not our bug
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArchiveDamaged(f"{path} is damaged ({type(e).__name__}: {_reason(e)})") from None
    except DownloadError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if wanted - found:
        shutil.rmtree(tmp)
        raise DownloadError(f"{path} does not hold {', '.join(sorted(wanted - found))}")
    n = 0
    for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
        dst = dest / src.relative_to(tmp)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        n += 1
    shutil.rmtree(tmp)
    return n


def _reason(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _unpack(path: Path, out_path, progress: bool) -> None:
    """Each wanted member of a zip or tar archive to `out_path(name)`."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in tqdm(zf.infolist(), desc=f"extract {path.name}", unit="file", disable=not progress,
                             leave=False):
                out = None if info.is_dir() else out_path(info.filename)
                if out is not None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as tf:
            for info in tqdm(tf, desc=f"extract {path.name}", unit="file", disable=not progress, leave=False):
                out = out_path(info.name) if info.isfile() else None  # links and devices are never needed
                if out is not None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with tf.extractfile(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
    else:
        raise DownloadError(f"{path} is neither a zip nor a tar archive; delete it and run again")
