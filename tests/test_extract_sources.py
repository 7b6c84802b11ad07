"""Stage 1 reuses or resumes a cache only for the images and captions it was made from, says what it could
not read, and writes no cache of no image. Six Flickr8k photos in two folders under the same names."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

import stage1_extract.__main__ as cli
from common.feature_cache import CacheError, parts_dir, read_meta
from reliability_helpers import one_error_line
from stage1_extract.cache_writer import CacheWriter
from stage1_extract.extract import ExtractConfig, extract, setup_extract


@pytest.fixture(scope="module")
def trips(flickr_dir, tmp_path_factory) -> Path:
    """trip1/ and trip2/: the same six file names, other photos in each (a camera's IMG_0001.jpg twice)."""
    root = tmp_path_factory.mktemp("trips")
    photos = sorted((flickr_dir / "Images").iterdir())[:12]
    names = [f"IMG_{i:04d}.jpg" for i in range(6)]
    for trip, chosen in (("trip1", photos[:6]), ("trip2", photos[6:])):
        (root / trip).mkdir()
        for name, photo in zip(names, chosen):
            shutil.copy(photo, root / trip / name)
    (root / "captions.txt").write_text("image,caption\n" + "".join(f"{n},a photo of a trip .\n" for n in names))
    return root


def _args(trips: Path, images: str, out: Path, *more) -> list[str]:
    return ["--images", str(trips / images), "--captions", str(trips / "captions.txt"), "--out", str(out),
            "--backbone", "mobilenet_v2", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--no-progress",
            *more]


def _run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def test_a_finished_cache_is_not_taken_for_another_folder_of_the_same_names(trips, tmp_path):
    """The second trip's run said "already complete" and the first trip's features were trained on."""
    out = tmp_path / "auto.h5"
    assert _run(*_args(trips, "trip1", out)).exit_code == 0
    line = one_error_line(_run(*_args(trips, "trip2", out)))
    assert "made differently" in line and "images_dir" in line and "trip2" in line
    line = one_error_line(_run(*_args(trips, "trip2", out, "--dry-run")))  # the dry run says so too
    assert "images_dir" in line
    (tmp_path / "link").symlink_to(trips / "trip1")  # the same folder by another path is the same folder
    again = _run("--images", tmp_path / "link", *_args(trips, "trip1", out)[2:])
    assert again.exit_code == 0 and "already complete (6 images); nothing to do" in again.output
    assert read_meta(out).images_dir == str(trips / "trip1")


def test_unfinished_work_is_not_resumed_from_another_folder(trips, tmp_path):
    """Resuming mixed two image sets in one cache: the rows done before came from the first folder."""
    out = tmp_path / "mix.h5"
    records, _, _, meta = setup_extract(ExtractConfig(images=str(trips / "trip1"), captions=str(trips / "captions.txt"),
                                                      out=str(out), backbone="mobilenet_v2", device="cpu"), _no_dist())
    CacheWriter(out, [r.key for r in records], meta).close()  # started from trip1, then stopped
    with pytest.raises(CacheError, match="started with other settings.*images_dir"):
        extract(ExtractConfig(images=str(trips / "trip2"), captions=str(trips / "captions.txt"), out=str(out),
                              backbone="mobilenet_v2", workers=0, device="cpu", progress=False))


def _no_dist():
    from stage1_extract.distributed import Dist

    return Dist()


def test_a_run_that_reads_no_image_writes_nothing_and_says_which_folder(trips, tmp_path):
    """The parent folder by mistake: every image skipped, exit 0, and a finished cache of no image that the
    rerun with the right folder called complete."""
    out = tmp_path / "c.h5"
    line = one_error_line(_run(*_args(trips, ".", out)))
    assert "none of the 6 images could be read" in line and f"--images {trips / '.'}" in line
    assert not out.exists() and not parts_dir(out).exists()
    right = _run(*_args(trips, "trip1", out))
    assert right.exit_code == 0 and "6 extracted now" in right.output


def test_a_finished_cache_says_which_images_it_could_not_read(trips, tmp_path):
    """A rerun after the broken photo was fixed said "already complete" and nothing of the one left out."""
    folder = tmp_path / "photos"
    shutil.copytree(trips / "trip1", folder)
    (folder / "IMG_0003.jpg").write_bytes(b"")
    out = tmp_path / "c.h5"
    first = _run("--images", folder, *_args(trips, "trip1", out)[2:])
    assert first.exit_code == 0 and "1 skipped" in first.output
    again = _run("--images", folder, *_args(trips, "trip1", out)[2:])
    assert again.exit_code == 0
    assert ("already complete (6 images); 1 of them could not be read when it was made (first: IMG_0003.jpg: "
            in again.output) and "delete it and re-run to retry them" in again.output
    from stage2_decoder.train import main as train_main  # training says whose captions it leaves out

    r = CliRunner().invoke(train_main, ["--features", str(out), "--out", str(tmp_path / "run"), "--epochs", "1",
                                        "--scst-epochs", "0", "--embed-size", "8", "--hidden-size", "8",
                                        "--vocab-threshold", "1", "--device", "cpu", "--no-progress", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "warning: 1 images of" in r.stderr and "could not be read in stage 1 and are left out (first: " \
        "IMG_0003.jpg" in r.stderr


def test_a_file_that_is_not_a_cache_at_out_is_named_with_what_to_do(trips, tmp_path):
    """The advice was "re-run stage 1 to rebuild it", which gave the same error again."""
    out = tmp_path / "notes.h5"
    out.write_text("hello\n")
    line = one_error_line(_run(*_args(trips, "trip1", out)))
    assert "not a readable HDF5 file" in line and "delete it" in line and "another --out" in line
    assert out.read_text() == "hello\n"


def test_a_symlinked_folder_re_pointed_at_another_is_another_source(trips, tmp_path):
    """The cache kept the link's own path: re-pointed at the second trip, the link was still the same folder,
    so the finished cache was reused ("already complete") and unfinished work resumed into a mixed cache."""
    link = tmp_path / "photos"
    link.symlink_to(trips / "trip1")
    out = tmp_path / "c.h5"
    assert _run("--images", link, *_args(trips, "trip1", out)[2:]).exit_code == 0
    assert read_meta(out).images_dir == str(trips / "trip1")  # where the photos really were
    link.unlink()
    link.symlink_to(trips / "trip2")
    line = one_error_line(_run("--images", link, *_args(trips, "trip1", out)[2:]))
    assert "made differently" in line and "images_dir" in line
    assert _run(*_args(trips, "trip1", out)).exit_code == 0  # the folder it was made from is still it


def test_a_dry_run_says_when_unfinished_work_would_be_refused(trips, tmp_path):
    """The dry run said "resumes the work in OUT.parts" where the run refused those parts."""
    out = tmp_path / "mix.h5"
    records, _, _, meta = setup_extract(ExtractConfig(images=str(trips / "trip1"), captions=str(trips / "captions.txt"),
                                                      out=str(out), backbone="mobilenet_v2", device="cpu"), _no_dist())
    CacheWriter(out, [r.key for r in records], meta).close()  # started from trip1, then stopped
    line = one_error_line(_run(*_args(trips, "trip2", out, "--dry-run")))
    assert "started with other settings" in line and "images_dir" in line
    ok = _run(*_args(trips, "trip1", out, "--dry-run"))
    assert ok.exit_code == 0 and f"resumes the work in {parts_dir(out)}" in ok.output


def test_a_resume_retries_the_images_an_earlier_run_could_not_read(trips, tmp_path):
    """Images missing when a run was interrupted (a folder not yet mounted) stayed failed in the resumed run's
    cache, though the files were there by then; an uninterrupted run would have read them."""
    out = tmp_path / "c.h5"
    records, _, _, meta = setup_extract(ExtractConfig(images=str(trips / "trip1"), captions=str(trips / "captions.txt"),
                                                      out=str(out), backbone="mobilenet_v2", device="cpu"), _no_dist())
    w = CacheWriter(out, [r.key for r in records], meta)
    w.write([], None, {0: "IMG_0000.jpg: FileNotFoundError: [Errno 2] No such file or directory"})
    w.close()  # interrupted after its first batch
    r = _run(*_args(trips, "trip1", out))
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        assert list(f["status"][:]) == [1] * 6 and not any(f["errors"][:])
