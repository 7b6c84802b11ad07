"""Download the official caption datasets: resumable, verified, extracted into one documented layout.

    python -m common.data download coco2014 [--root data] [--mirror URL] [--quick] [--remove-archives]
    python -m common.data list

Layout under ROOT (`--root`, default `data`):

    ROOT/archives/                  the archives as downloaded, shared by the datasets
        train2014.zip ...           complete and verified (`NAME.part` while still downloading)
        manifest.json               size, md5 and sha256 of every verified archive: reruns check against it
    ROOT/coco2014/                  train2014/COCO_train2014_*.jpg, val2014/COCO_val2014_*.jpg,
                                    annotations/captions_{train,val}2014.json, karpathy/dataset_coco.json
    ROOT/coco2017/                  train2017/*.jpg, val2017/*.jpg, annotations/captions_{train,val}2017.json
    ROOT/flickr8k/                  Flicker8k_Dataset/*.jpg (the archive's own spelling), Flickr8k.token.txt,
                                    Flickr_8k.{train,dev,test}Images.txt, karpathy/dataset_flickr8k.json
    ROOT/flickr30k/                 karpathy/dataset_flickr30k.json; the photos are only given out on request
                                    (see `list`), into flickr30k-images/
    ROOT/NAME/.extracted.json       which archive (by sha256) was extracted there; written last, so an
                                    interrupted extraction is redone on the next run

Each archive is fetched to `NAME.part` and continued with an HTTP Range request when a run is cut
off; it only takes its final name once its size and checksum are right (md5 where the registry
knows it, else the size; the sha256 computed then goes to the manifest so later runs re-verify).
A second run downloads nothing: it re-hashes the archives (`--quick`: checks sizes only) and skips
what is already extracted. `--mirror URL` (or $CAPCACHE_DATA_MIRROR) fetches every archive as
URL/FILENAME instead of from its official host (the tests point it at a loopback server).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import click
from tqdm import tqdm

from common.archives import CHUNK, ArchiveDamaged, DownloadError, extract_archive
from common.atomic import atomic_write
from common.lock import LOCK_NAME, hold
from common.jsonio import JSONFileError, read_json
from common.text import printable

MIRROR_ENV = "CAPCACHE_DATA_MIRROR"
DEFAULT_ROOT = "data"
RETRIES = 3  # a connection that breaks mid-file is resumed this many times before giving up
RETRY_WAIT_S = 1.0  # doubled after each broken attempt
TIMEOUT_S = 60
# an archive without a published size is still capped: a mirror that sends no Content-Length (or a wrong one)
# must not fill the disk; above the largest archive of the registry (train2017.zip, 19.3 GB)
MAX_ARCHIVE_BYTES = 32 * 2**30


@dataclass(frozen=True)
class Archive:
    url: str  # the official address
    size: int | None = None  # published size in bytes, when known
    md5: str | None = None  # published md5, when known (never guessed: None means "check the size only")
    members: tuple[str, ...] = ()  # extract only these files (matched by base name), flattened into `into`
    into: str = "."  # folder, under the dataset's folder, that receives the archive's contents
    max_size: int | None = None  # without a published size: more than this is not the archive

    @property
    def cap(self) -> int:
        """The most bytes a download of it may take."""
        return self.size or self.max_size or MAX_ARCHIVE_BYTES

    @property
    def filename(self) -> str:
        return PurePosixPath(urllib.parse.urlsplit(self.url).path).name


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    archives: tuple[Archive, ...]
    # what stage 1 reads afterwards, relative to ROOT/NAME: printed as the next command
    images: str
    captions: str
    fmt: str
    note: str = ""


COCO = "http://images.cocodataset.org"
KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
FLICKR8K = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"


def _karpathy(json_name: str) -> Archive:
    # Karpathy & Fei-Fei's split files (dataset_{coco,flickr8k,flickr30k}.json), about 37 MB zipped;
    # no published checksum
    return Archive(KARPATHY_URL, members=(json_name,), into="karpathy", max_size=200 * 2**20)


# md5 and sizes as published for the COCO zips (and used by LAVIS, PaddleDetection, torchvision-based
# loaders); the other hosts publish none, so those archives are checked by the size the server reports.
REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("coco2014", "MS-COCO 2014 train+val images, caption annotations and the Karpathy split (20.4 GB)",
                (Archive(f"{COCO}/zips/train2014.zip", 13_510_573_713, "0da8c0bd3d6becc4dcb32757491aca88"),
                 Archive(f"{COCO}/zips/val2014.zip", 6_645_013_297, "a3d79f5ed8d289b7a7554ce06a5782b3"),
                 Archive(f"{COCO}/annotations/annotations_trainval2014.zip", 252_872_794,
                         "0a379cfc70b0e71301e0f377548639bd"),
                 _karpathy("dataset_coco.json")),
                images=".", captions="karpathy/dataset_coco.json", fmt="karpathy"),
    DatasetSpec("coco2017", "MS-COCO 2017 train+val images and caption annotations (20.4 GB)",
                (Archive(f"{COCO}/zips/train2017.zip", 19_336_861_798, "cced6f7f71b7629ddf16f17bbcfab6b2"),
                 Archive(f"{COCO}/zips/val2017.zip", 815_585_330, "442b8da7639aecaf257c1dceb8ba8c80"),
                 Archive(f"{COCO}/annotations/annotations_trainval2017.zip", 252_907_541,
                         "f4bbac642086de4f52a3fdda2de5fa2c")),
                images="train2017", captions="annotations/captions_train2017.json", fmt="coco",
                note="the Karpathy split names 2014 files: for it use coco2014 (the same photos)"),
    DatasetSpec("flickr8k", "Flickr8k images and captions (the widely used copy of the Illinois release, ~1.1 GB)"
                " and the Karpathy split",
                (Archive(f"{FLICKR8K}/Flickr8k_Dataset.zip", max_size=4 * 2**30),
                 Archive(f"{FLICKR8K}/Flickr8k_text.zip", max_size=100 * 2**20),
                 _karpathy("dataset_flickr8k.json")),
                images="Flicker8k_Dataset", captions="karpathy/dataset_flickr8k.json", fmt="karpathy"),
    DatasetSpec("flickr30k", "Flickr30k captions with the Karpathy split (the photos are not downloadable)",
                (_karpathy("dataset_flickr30k.json"),),
                images="flickr30k-images", captions="karpathy/dataset_flickr30k.json", fmt="karpathy",
                note="the photos are given out on request by the University of Illinois "
                     "(https://shannon.cs.illinois.edu/DenotationGraph/): put them in flickr30k-images/"),
)}


# --- fetching -----------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    """A download record (manifest.json, .extracted.json): {} when absent; one DownloadError when it is not a
    JSON object (bounded in size and depth: common/jsonio.py)."""
    try:
        return read_json(path, "download record", expect=dict, max_bytes=16 * 2**20)
    except FileNotFoundError:
        return {}
    except JSONFileError as e:
        raise DownloadError(f"{e}; delete it and run again") from None


_MANIFEST_FIELDS = {"size": int, "sha256": str}
_MARKER_FIELDS = {"sha256": str, "files": int}


def _entry(record: dict, name: str, path: Path, fields: dict[str, type]) -> dict | None:
    """`record[name]` checked to be an object with `fields` of their types (None when absent)."""
    entry = record.get(name)
    if entry is None:
        return None
    bad = not isinstance(entry, dict) or any(not isinstance(entry.get(f), t) or isinstance(entry.get(f), bool)
                                             for f, t in fields.items())
    if not bad and not isinstance(entry.get("archive_removed", False), bool):
        bad = True
    if bad:
        raise DownloadError(f"download record {printable(path)}: its entry {name!r} is damaged (needs "
                            f"{', '.join(f'{f}: {t.__name__}' for f, t in fields.items())}); delete it and run again")
    return entry


def _write_json(path: Path, value: dict) -> None:
    atomic_write(path, json.dumps(value, indent=1, sort_keys=True), what="download record")


def _hashes(path: Path, progress: bool) -> tuple[str, str]:
    """(md5, sha256) of a file in one pass."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"verify {path.name}", disable=not progress, leave=False) as bar:
        while block := f.read(CHUNK * 8):
            md5.update(block)
            sha.update(block)
            bar.update(len(block))
    return md5.hexdigest(), sha.hexdigest()


def _source(archive: Archive, mirror: str | None) -> str:
    return f"{mirror.rstrip('/')}/{archive.filename}" if mirror else archive.url


def _unreachable(url: str, reason, into: Path, archive: Archive) -> DownloadError:
    host = urllib.parse.urlsplit(url).netloc
    return DownloadError(f"could not reach {host}: {reason}; download {archive.url} by hand into {into} "
                         f"and run this command again")


def _total_from(resp, start: int) -> int | None:
    """The full size of the file from a 200 or 206 answer's headers (None if the server does not say)."""
    if resp.status == 206:
        total = (resp.headers.get("Content-Range") or "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _download(url: str, part: Path, archive: Archive, progress: bool) -> None:
    """Fetch url into `part`, continuing what is there with a Range request; retries broken connections."""
    for attempt in range(RETRIES + 1):
        if part.is_symlink():  # planted: never appended to through a link
            part.unlink()
        have = part.stat().st_size if part.exists() else 0
        if archive.size is not None and have > archive.size:  # not a prefix of the right file: start over
            part.unlink()
            have = 0
        if archive.size is not None and have == archive.size:
            return
        headers = {"User-Agent": "capcache-data/1"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing after `have`: whole if the server's size agrees (`bytes */N`)
                if (e.headers.get("Content-Range") or "").rpartition("/")[2] == str(have):
                    return
                part.unlink()  # longer than the file, or the server will not say: start over
                continue
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
        except urllib.error.URLError as e:
            raise _unreachable(url, e.reason, part.parent, archive) from e
        except (TimeoutError, ConnectionError, http.client.HTTPException) as e:  # also a reply that is not HTTP
            raise _unreachable(url, f"{type(e).__name__}: {e}", part.parent, archive) from e
        with resp:
            resuming = bool(have) and resp.status == 206 and \
                (resp.headers.get("Content-Range") or "").startswith(f"bytes {have}-")
            if not resuming:
                have = 0  # the server ignored the Range request: take the whole file again
            total = _total_from(resp, have)
            if archive.size is not None and total is not None and total != archive.size:
                raise DownloadError(f"{url} is {total:,} bytes, but {archive.filename} should be "
                                    f"{archive.size:,}; is the mirror serving another file?")
            if total is not None and total > archive.cap:
                raise DownloadError(f"{url} is {total:,} bytes, more than {archive.filename} can be "
                                    f"({archive.cap:,}); is the mirror serving another file?")
            try:
                flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if resuming else os.O_TRUNC)
                with os.fdopen(os.open(part, flags | getattr(os, "O_NOFOLLOW", 0), 0o644), "ab" if resuming else "wb") as f, \
                        tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=archive.filename, disable=not progress, dynamic_ncols=True) as bar:
                    while chunk := resp.read(CHUNK):
                        if have + len(chunk) > archive.cap:  # no or a wrong Content-Length: stop at the cap
                            f.close()
                            part.unlink()
                            raise DownloadError(f"{url} sent more than the {archive.cap:,} bytes {archive.filename} "
                                                f"can be; is the mirror serving another file? (nothing kept)")
                        have += len(chunk)
                        f.write(chunk)
                        bar.update(len(chunk))
                broken = None
            except DownloadError:
                raise
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                broken = e
        got = part.stat().st_size
        if broken is None and (total is None or got == total):
            return
        if attempt == RETRIES:
            raise DownloadError(f"downloading {archive.filename} broke off at {got:,} of {total or '?'} bytes "
                                f"({broken or 'connection closed early'}); run again to resume")
        time.sleep(RETRY_WAIT_S * 2 ** attempt)
    raise DownloadError(f"could not download {archive.filename} from {url} in {RETRIES + 1} attempts; run again")


def _verify(archive: Archive, path: Path, known: dict | None, progress: bool) -> tuple[str | None, str, str]:
    """(what is wrong with `path` as `archive`, or None; its md5; its sha256)."""
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        return f"is {size:,} bytes, expected {archive.size:,}", "", ""
    md5, sha = _hashes(path, progress)
    if archive.md5 and md5 != archive.md5:
        return f"has md5 {md5}, expected {archive.md5}", md5, sha
    if known and known.get("sha256") != sha:
        return f"has sha256 {sha}, but {known.get('sha256')} when it was downloaded", md5, sha
    return None, md5, sha


def _record(manifest_path: Path, archive: Archive, path: Path, md5: str, sha: str) -> None:
    manifest = _read_json(manifest_path)  # re-read: another archive may have been recorded meanwhile
    manifest[archive.filename] = {"url": archive.url, "size": path.stat().st_size, "md5": md5, "sha256": sha}
    _write_json(manifest_path, manifest)


def fetch(archive: Archive, archives_dir: Path, mirror: str | None = None, quick: bool = False,
          progress: bool = True) -> tuple[Path, str, str]:
    """Make `archives_dir/FILENAME` the verified archive; returns (path, sha256, what was done)."""
    archives_dir.mkdir(parents=True, exist_ok=True)
    final, part = archives_dir / archive.filename, archives_dir / (archive.filename + ".part")
    manifest_path = archives_dir / "manifest.json"
    known = _entry(_read_json(manifest_path), archive.filename, manifest_path, _MANIFEST_FIELDS)
    if final.exists():
        size = final.stat().st_size
        if quick and known and known.get("size") == size and (archive.size is None or archive.size == size):
            return final, known["sha256"], "present (size checked)"
        problem, md5, sha = _verify(archive, final, known, progress)
        if problem:
            bad = final.with_name(final.name + ".bad")
            os.replace(final, bad)
            raise DownloadError(f"{final} {problem}: moved it to {bad.name}; run again to download it again")
        if not known:  # put there by hand: record it so later runs re-verify against it
            _record(manifest_path, archive, final, md5, sha)
        return final, sha, "present (verified)"

    action = "resumed" if part.exists() and part.stat().st_size else "downloaded"
    _download(_source(archive, mirror), part, archive, progress)
    problem, md5, sha = _verify(archive, part, None, progress)  # a fresh file answers to the registry only
    if problem:
        part.unlink()  # never leave a bad file where a resume or a rerun would take it for good
        raise DownloadError(f"downloaded {archive.filename} {problem}; removed it, run again to retry "
                            f"(or download {archive.url} by hand into {archives_dir})")
    os.replace(part, final)
    _record(manifest_path, archive, final, md5, sha)
    return final, sha, action


# --- a whole dataset ----------------------------------------------------------------------------------------

@dataclass
class Step:
    archive: str
    fetched: str  # downloaded | resumed | present (verified) | present (size checked) | removed earlier
    extracted: str  # extracted (N files) | already extracted


def download_dataset(spec: DatasetSpec | str, root: str | os.PathLike = DEFAULT_ROOT, mirror: str | None = None,
                     quick: bool = False, remove_archives: bool = False, progress: bool = True) -> list[Step]:
    """Download, verify and extract every archive of a dataset into ROOT/NAME; idempotent."""
    if isinstance(spec, str):
        if spec not in REGISTRY:
            raise DownloadError(f"unknown dataset {spec!r}; choose from {', '.join(REGISTRY)}")
        spec = REGISTRY[spec]
    root = Path(root)
    archives_dir, dest = root / "archives", root / spec.name
    dest.mkdir(parents=True, exist_ok=True)
    archives_dir.mkdir(parents=True, exist_ok=True)
    # one download at a time per archives folder: datasets share archives (caption_datasets.zip), and two
    # runs appending to one .part corrupt it
    with hold(archives_dir / LOCK_NAME, "archives folder"):
        return _download_locked(spec, archives_dir, dest, mirror, quick, remove_archives, progress)


def _download_locked(spec: DatasetSpec, archives_dir: Path, dest: Path, mirror: str | None, quick: bool,
                     remove_archives: bool, progress: bool) -> list[Step]:
    marker_path = dest / ".extracted.json"
    steps = []
    for archive in spec.archives:
        key = f"{archive.filename}:{archive.into}:{','.join(archive.members)}"  # one archive can feed 2 folders
        done = _entry(_read_json(marker_path), key, marker_path, _MARKER_FIELDS)
        if done and done.get("archive_removed") and not (archives_dir / archive.filename).exists():
            steps.append(Step(archive.filename, "removed earlier", "already extracted"))
            continue
        path, sha, fetched = fetch(archive, archives_dir, mirror, quick, progress)
        if done and done.get("sha256") == sha:
            extracted = "already extracted"
        else:
            try:
                n = extract_archive(path, dest, archive.members, archive.into, progress)
            except ArchiveDamaged as e:
                raise DownloadError(f"{e}: {_forget(archive, path)}; run again to download it again") from None
            marker = _read_json(marker_path)
            marker[key] = {"sha256": sha, "files": n}
            _write_json(marker_path, marker)
            extracted = f"extracted ({n} files)"
        if remove_archives:  # the marker now stands for it: a rerun skips this archive
            marker = _read_json(marker_path)
            marker[key]["archive_removed"] = True
            _write_json(marker_path, marker)
            path.unlink()
        steps.append(Step(archive.filename, fetched, extracted))
    return steps


def _forget(archive: Archive, path: Path) -> str:
    """Un-record a verified archive that turned out damaged and move it aside, so the next run downloads it
    again instead of trusting it; says what was done."""
    manifest_path = path.parent / "manifest.json"
    manifest = _read_json(manifest_path)
    if manifest.pop(archive.filename, None) is not None:
        _write_json(manifest_path, manifest)
    bad = path.with_name(path.name + ".bad")
    os.replace(path, bad)
    return f"moved it to {bad.name} and removed it from {manifest_path.name}"


def next_command(spec: DatasetSpec, root: str | os.PathLike) -> str:
    d = Path(root) / spec.name
    return (f"python -m stage1_extract --dataset {spec.fmt} --images {d / spec.images} "
            f"--captions {d / spec.captions} --out cache/{spec.name}-resnet152.h5")


# --- CLI ----------------------------------------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Download the official caption datasets (see `python -m common.data list`)."""


@main.command("list")
def list_cmd():
    """The datasets this tool can download, with their archives."""
    for spec in REGISTRY.values():
        click.echo(f"{spec.name}: {spec.description}")
        for a in spec.archives:
            size = f"{a.size / 1e9:.2f} GB" if a.size else "size not published"
            click.echo(f"    {a.url}  ({size}{', md5 ' + a.md5 if a.md5 else ''})")
        if spec.note:
            click.echo(f"    note: {spec.note}")


@main.command("download")
@click.argument("name", type=click.Choice(list(REGISTRY)))
@click.option("--root", default=DEFAULT_ROOT, show_default=True, type=click.Path(file_okay=False),
              help="Folder receiving archives/ and NAME/.")
@click.option("--mirror", default=None, envvar=MIRROR_ENV, show_envvar=True,
              help="Fetch every archive as MIRROR/FILENAME instead of from its official host.")
@click.option("--quick", is_flag=True, help="Trust archives already recorded in the manifest if their size matches "
                                            "(skip re-hashing).")
@click.option("--remove-archives", is_flag=True, help="Delete each archive once extracted (saves ~half the disk).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def download_cmd(name, root, mirror, quick, remove_archives, no_progress):
    """Download, verify and extract dataset NAME into ROOT/NAME (idempotent; resumes cut-off downloads)."""
    from common.cli import run_guarded  # imports torch (via backbones): only pay for it when running

    def work():
        steps = download_dataset(name, root, mirror, quick, remove_archives, progress=not no_progress)
        for s in steps:
            click.echo(f"{s.archive}: {s.fetched}, {s.extracted}")
        spec = REGISTRY[name]
        click.echo(f"{name} is ready in {Path(root) / name}")
        if spec.note:
            click.echo(f"note: {spec.note}")
        click.echo(f"next: {next_command(spec, root)}")
        return 0

    raise SystemExit(run_guarded(work, interrupted_msg="download interrupted; run the same command again to "
                                                      "resume (partial files end in .part)"))


if __name__ == "__main__":
    main()
