"""`common.data`: download, resume, verify, extract and rerun, against a loopback HTTP server the test starts.

The server serves tiny archives built here and honours `Range: bytes=N-` (the stdlib handler does
not), so resuming is really exercised: it logs every request and counts the body bytes it sent.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import random
import re
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

import common.archives as archives
import common.data as data
from common.archives import ArchiveDamaged, DownloadError, extract_archive
from common.data import REGISTRY, Archive, DatasetSpec, download_dataset


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the stdlib's name)
        srv = self.server
        name = self.path.lstrip("/")
        rng = self.headers.get("Range")
        srv.log.append((name, rng))
        body = srv.files.get(name)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if rng and srv.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if not srv.no_length:  # else the body ends when the connection closes (HTTP/1.0)
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if srv.cut_next:  # announce the whole length, send half, hang up: a connection that breaks
            srv.cut_next -= 1
            payload = payload[: len(payload) // 2]
            self.close_connection = True
        self.wfile.write(payload)
        srv.sent += len(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.log, srv.sent, srv.ranges, srv.cut_next, srv.no_length = {}, [], 0, True, 0, False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in entries.items():
            zf.writestr(name, content)
    return buf.getvalue()


def _targz(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, content in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return buf.getvalue()


RNG = random.Random(0)
IMAGE_A, IMAGE_B = RNG.randbytes(60_000), RNG.randbytes(45_000)  # incompressible: the zip stays ~100 kB
CAPTIONS = json.dumps({"images": [], "annotations": []}).encode()
KARPATHY = {"dataset_coco.json": b'{"images": [], "dataset": "coco"}', "dataset_flickr8k.json": b'{"images": []}'}


@pytest.fixture
def tiny(server):
    """A three-archive dataset spec (zip with an md5, tar.gz without, a zip of which one member is kept)."""
    images = _zip({"train2014/COCO_train2014_000000000009.jpg": IMAGE_A,
                   "train2014/COCO_train2014_000000000025.jpg": IMAGE_B,
                   "__MACOSX/train2014/._COCO_train2014_000000000009.jpg": b"resource fork"})
    ann = _targz({"annotations/captions_train2014.json": CAPTIONS})
    karpathy = _zip(KARPATHY)
    server.files.update({"train2014.zip": images, "annotations.tar.gz": ann, "caption_datasets.zip": karpathy})
    spec = DatasetSpec("tiny", "test data",
                       (Archive("http://official.invalid/zips/train2014.zip", len(images),
                                hashlib.md5(images).hexdigest()),
                        Archive("http://official.invalid/annotations.tar.gz"),
                        Archive("http://official.invalid/caption_datasets.zip", members=("dataset_coco.json",),
                                into="karpathy")),
                       images=".", captions="karpathy/dataset_coco.json", fmt="karpathy")
    return spec


def _get(spec, root, server, **kw):
    return download_dataset(spec, root, mirror=server.url, progress=False, **kw)


def _check_layout(root: Path):
    d = root / "tiny"
    assert (d / "train2014/COCO_train2014_000000000009.jpg").read_bytes() == IMAGE_A
    assert (d / "train2014/COCO_train2014_000000000025.jpg").read_bytes() == IMAGE_B
    assert (d / "annotations/captions_train2014.json").read_bytes() == CAPTIONS
    assert (d / "karpathy/dataset_coco.json").read_bytes() == KARPATHY["dataset_coco.json"]
    assert not (d / "karpathy/dataset_flickr8k.json").exists()  # only the member asked for
    assert not (d / "__MACOSX").exists()
    assert not list(d.glob(".extracting-*")) and not list((root / "archives").glob("*.part"))


def test_fresh_download_layout_and_manifest(tmp_path, server, tiny):
    steps = _get(tiny, tmp_path, server)
    assert [s.fetched for s in steps] == ["downloaded"] * 3
    assert [s.extracted for s in steps] == ["extracted (2 files)", "extracted (1 files)", "extracted (1 files)"]
    assert sorted(name for name, _ in server.log) == ["annotations.tar.gz", "caption_datasets.zip", "train2014.zip"]
    assert all(rng is None for _, rng in server.log)
    _check_layout(tmp_path)
    manifest = json.loads((tmp_path / "archives/manifest.json").read_text())
    for name, body in server.files.items():
        assert (tmp_path / "archives" / name).read_bytes() == body
        assert manifest[name]["sha256"] == hashlib.sha256(body).hexdigest()
        assert manifest[name]["size"] == len(body)


def test_rerun_downloads_nothing(tmp_path, server, tiny):
    _get(tiny, tmp_path, server)
    server.log.clear()
    steps = _get(tiny, tmp_path, server)
    assert server.log == []
    assert [s.fetched for s in steps] == ["present (verified)"] * 3
    assert [s.extracted for s in steps] == ["already extracted"] * 3
    assert [s.fetched for s in _get(tiny, tmp_path, server, quick=True)] == ["present (size checked)"] * 3
    assert server.log == []
    _check_layout(tmp_path)


def test_resume_fetches_only_the_missing_bytes(tmp_path, server, tiny):
    body = server.files["train2014.zip"]
    half = len(body) // 2
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives/train2014.zip.part").write_bytes(body[:half])
    steps = _get(tiny, tmp_path, server)
    assert steps[0].fetched == "resumed"
    assert ("train2014.zip", f"bytes={half}-") in server.log
    others = sum(len(server.files[n]) for n in ("annotations.tar.gz", "caption_datasets.zip"))
    assert server.sent == len(body) - half + others  # the first half was not sent again
    _check_layout(tmp_path)


def test_connection_cut_midway_is_resumed(tmp_path, server, tiny, monkeypatch):
    monkeypatch.setattr(data, "RETRY_WAIT_S", 0.0)
    server.cut_next = 1
    _get(tiny, tmp_path, server)
    first, second = [rng for name, rng in server.log if name == "train2014.zip"]
    assert first is None and second == f"bytes={len(server.files['train2014.zip']) // 2}-"
    _check_layout(tmp_path)


def test_server_ignoring_range_restarts_from_zero(tmp_path, server, tiny):
    server.ranges = False  # answers 200 with the whole file: the partial file must be replaced, not appended to
    body = server.files["train2014.zip"]
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives/train2014.zip.part").write_bytes(b"x" * 1000)
    _get(tiny, tmp_path, server)
    assert (tmp_path / "archives/train2014.zip").read_bytes() == body
    _check_layout(tmp_path)


@pytest.mark.parametrize("extra", [0, 100])  # a whole part (size known only to the server), or a longer one
def test_part_at_or_past_the_end(tmp_path, server, tiny, extra):
    body = server.files["annotations.tar.gz"]  # no size in the spec: the server's 416 answer decides
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives/annotations.tar.gz.part").write_bytes(body + b"x" * extra)
    _get(tiny, tmp_path, server)
    ranges = [rng for name, rng in server.log if name == "annotations.tar.gz"]
    assert ranges == ([f"bytes={len(body)}-"] if extra == 0 else [f"bytes={len(body) + extra}-", None])
    _check_layout(tmp_path)


def test_archives_put_there_by_hand_are_verified_and_used(tmp_path, server, tiny):
    (tmp_path / "archives").mkdir()
    for name, body in server.files.items():  # what the offline error message asks a user to do
        (tmp_path / "archives" / name).write_bytes(body)
    steps = _get(tiny, tmp_path, server)
    assert server.log == [] and [s.fetched for s in steps] == ["present (verified)"] * 3
    _check_layout(tmp_path)
    manifest = json.loads((tmp_path / "archives/manifest.json").read_text())
    assert manifest["annotations.tar.gz"]["sha256"] == hashlib.sha256(server.files["annotations.tar.gz"]).hexdigest()


def test_checksum_mismatch_leaves_no_complete_file(tmp_path, server, tiny):
    good = tiny.archives[0]
    bad = DatasetSpec("tiny", "", (Archive(good.url, good.size, "0" * 32),), ".", "x", "coco")
    with pytest.raises(DownloadError, match="md5") as e:
        _get(bad, tmp_path, server)
    assert "\n" not in str(e.value)
    arch = tmp_path / "archives"
    assert not (arch / "train2014.zip").exists() and not (arch / "train2014.zip.part").exists()
    assert "train2014.zip" not in json.loads((arch / "manifest.json").read_text() if (arch / "manifest.json").exists()
                                             else "{}")
    assert not (tmp_path / "tiny/train2014").exists()
    _get(tiny, tmp_path, server)  # with the right checksum the next run succeeds
    _check_layout(tmp_path)


def test_size_mismatch_is_refused_before_writing(tmp_path, server, tiny):
    good = tiny.archives[0]
    spec = DatasetSpec("tiny", "", (Archive(good.url, good.size + 1, good.md5),), ".", "x", "coco")
    with pytest.raises(DownloadError, match="should be"):
        _get(spec, tmp_path, server)
    assert [p.name for p in (tmp_path / "archives").iterdir()] == [".lock"]  # the download's lock, no archive


def test_tampered_archive_is_caught_on_rerun(tmp_path, server, tiny):
    _get(tiny, tmp_path, server)
    path = tmp_path / "archives/annotations.tar.gz"  # no published checksum: the manifest's sha256 guards it
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DownloadError, match="sha256"):
        _get(tiny, tmp_path, server)
    assert not path.exists() and (tmp_path / "archives/annotations.tar.gz.bad").exists()
    server.log.clear()
    _get(tiny, tmp_path, server)
    assert [n for n, _ in server.log] == ["annotations.tar.gz"]
    assert path.read_bytes() == server.files["annotations.tar.gz"]


def test_remove_archives_then_rerun(tmp_path, server, tiny):
    _get(tiny, tmp_path, server, remove_archives=True)
    assert not [p for p in (tmp_path / "archives").iterdir() if p.name not in ("manifest.json", ".lock")]
    _check_layout(tmp_path)
    server.log.clear()
    steps = _get(tiny, tmp_path, server)
    assert server.log == [] and [s.fetched for s in steps] == ["removed earlier"] * 3


def test_unsafe_member_is_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    evil.write_bytes(_zip({"ok.txt": b"fine", "../escaped.txt": b"no"}))
    with pytest.raises(DownloadError, match="outside its folder"):
        extract_archive(evil, tmp_path / "out", progress=False)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out/ok.txt").exists()
    not_an_archive = tmp_path / "x.zip"
    not_an_archive.write_bytes(b"plain text")
    with pytest.raises(DownloadError, match="neither a zip nor a tar"):
        extract_archive(not_an_archive, tmp_path / "out", progress=False)


def test_registry_uses_official_addresses():
    coco = [a for s in REGISTRY.values() for a in s.archives if "cocodataset" in a.url]
    assert len(coco) == 6 and all(a.url.startswith("http://images.cocodataset.org/") for a in coco)
    assert all(re.fullmatch(r"[0-9a-f]{32}", a.md5) and a.size > 10**8 for a in coco)
    names = {a.filename for a in REGISTRY["coco2014"].archives}
    assert names == {"train2014.zip", "val2014.zip", "annotations_trainval2014.zip", "caption_datasets.zip"}
    assert REGISTRY["flickr30k"].archives[0].url.endswith("/deepimagesent/caption_datasets.zip")


# --- through the CLI, in a subprocess --------------------------------------------------------------------------

def _one_error_line(proc) -> str:
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_cli_unreachable_host_one_line(tmp_path, cli):
    with socket.socket() as s:  # a port nobody listens on: connection refused, like a machine offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = cli("common.data", "download", "flickr30k", "--root", tmp_path, "--no-progress",
                   env={"CAPCACHE_DATA_MIRROR": f"http://127.0.0.1:{port}"}, timeout=120)
    line = _one_error_line(proc)
    assert f"could not reach 127.0.0.1:{port}" in line
    assert "caption_datasets.zip by hand into" in line and str(tmp_path / "archives") in line


def test_cli_real_registry_entry_end_to_end(tmp_path, server, cli):
    server.files["caption_datasets.zip"] = _zip({**KARPATHY, "dataset_flickr30k.json": b'{"images": []}'})
    args = ["common.data", "download", "flickr30k", "--root", tmp_path, "--mirror", server.url, "--no-progress"]
    proc = cli(*args, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "flickr30k/karpathy/dataset_flickr30k.json").read_bytes() == b'{"images": []}'
    assert "next: python -m stage1_extract --dataset karpathy" in proc.stdout
    server.log.clear()
    steps = download_dataset("flickr30k", tmp_path, mirror=server.url, progress=False)  # the CLI's own call
    assert server.log == [] and [(s.fetched, s.extracted) for s in steps] == [("present (verified)",
                                                                               "already extracted")]


def test_cli_wrong_file_from_mirror(tmp_path, server, cli):
    server.files["train2014.zip"] = _zip({"train2014/a.jpg": b"tiny"})  # not the 13.5 GB archive
    proc = cli("common.data", "download", "coco2014", "--root", tmp_path, "--no-progress",
                   env={"CAPCACHE_DATA_MIRROR": server.url}, timeout=120)
    assert "should be 13,510,573,713" in _one_error_line(proc)
    assert not (tmp_path / "coco2014/train2014").exists()


# --- round three: records, damaged members, uncapped mirrors (tests/RELIABILITY.md) ------------------------

def test_a_mirror_without_content_length_is_capped(tmp_path, server):
    """No Content-Length and a body longer than the archive can be: stopped at the cap, nothing kept."""
    server.no_length = True
    server.files["big.zip"] = b"x" * 300_000
    archive = Archive("http://official.invalid/big.zip", max_size=100_000)
    with pytest.raises(DownloadError, match="sent more than the 100,000 bytes big.zip can be"):
        data.fetch(archive, tmp_path / "archives", mirror=server.url, progress=False)
    assert not list((tmp_path / "archives").iterdir())


def test_every_archive_without_a_published_size_has_a_cap():
    for spec in REGISTRY.values():
        for a in spec.archives:
            assert a.cap <= (a.size or 4 * 2**30), a.filename


def _damaged_zip() -> tuple[bytes, bytes]:
    content = json.dumps({"images": [{"sentences": [{"raw": f"caption {i}"} for i in range(2000)]}]}).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dataset_coco.json", content)
    good = buf.getvalue()
    bad = bytearray(good)
    middle = len(bad) // 2
    bad[middle:middle + 40] = bytes(40)  # inside the deflate stream: a zlib.error or a CRC error on reading
    return good, bytes(bad)


def test_a_damaged_member_is_one_error_and_the_archive_is_downloaded_again(tmp_path, server, tiny):
    good, bad = _damaged_zip()
    server.files["caption_datasets.zip"] = bad
    with pytest.raises(DownloadError, match=r"caption_datasets.zip is damaged .*moved it to caption_datasets.zip.bad"
                                            r" and removed it from manifest.json; run again") as e:
        _get(tiny, tmp_path, server)
    assert "\n" not in str(e.value)
    manifest = json.loads((tmp_path / "archives/manifest.json").read_text())
    assert "caption_datasets.zip" not in manifest and (tmp_path / "archives/caption_datasets.zip.bad").is_file()
    server.files["caption_datasets.zip"] = good  # the mirror is fixed: the rerun fetches it again and succeeds
    steps = _get(tiny, tmp_path, server)
    assert steps[-1].fetched == "downloaded"
    assert (tmp_path / "tiny/karpathy/dataset_coco.json").read_bytes() == \
        zipfile.ZipFile(io.BytesIO(good)).read("dataset_coco.json")


@pytest.mark.parametrize("record, text", [
    ("manifest.json", "[1, 2]"),
    ("manifest.json", '{"train2014.zip": "verified"}'),
    ("manifest.json", '{"train2014.zip": {"size": "big", "sha256": 5}}'),
    ("manifest.json", "[" * 100_000 + "]" * 100_000),
    ("extracted", '{"train2014.zip:.:": ["done"]}'),
    ("extracted", '{"train2014.zip:.:": {"sha256": "x", "files": 2, "archive_removed": "yes"}}'),
])
def test_wrong_typed_or_nested_download_records_are_one_error(tmp_path, server, tiny, record, text):
    path = tmp_path / "archives/manifest.json" if record == "manifest.json" else tmp_path / "tiny/.extracted.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(DownloadError, match=r"(damaged|must be a JSON object|nested deeper).*delete it and run again"):
        _get(tiny, tmp_path, server)


# --- archives a mirror (or a file put there by hand) could hold ----------------------------------------------

def test_a_zip_bomb_is_refused_before_a_byte_is_written(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:  # ~200 kB holding 200 MB of zeros
        zf.writestr("a.jpg", bytes(200 * 2**20))
    with pytest.raises(ArchiveDamaged, match=r"unpacks to more than .* bytes, over 100x its own size"):
        extract_archive(bomb, tmp_path / "out", progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # nothing written, no temp folder left


def test_a_tar_bomb_stops_at_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "RATIO_SLACK", 0)  # the cap: 100x the archive's few kB
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(_targz({f"{i}.jpg": bytes(2**20) for i in range(8)}))
    with pytest.raises(ArchiveDamaged, match="over 100x its own size"):
        extract_archive(bomb, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").rglob("*"))


@pytest.mark.parametrize("entries, says", [
    ({"a": b"file", "a/b": b"inside a file"}, "cannot be unpacked: .* for 'a'"),
    ({"a/b": b"x", "a": b"a file over a folder"}, "cannot be unpacked: Is a directory for 'a'"),
    ({".": b"the folder itself", "ok.jpg": b"fine"}, None),
])
def test_a_member_that_clashes_with_another_is_one_error_and_leaves_no_temp_folder(tmp_path, entries, says):
    z = tmp_path / "x.zip"
    z.write_bytes(_zip(entries))
    if says is None:  # "." names the folder: skipped, the rest extracted
        assert extract_archive(z, tmp_path / "out", progress=False) == 1 and (tmp_path / "out/ok.jpg").is_file()
    else:  # was a raw "[Errno 17] File exists: '.../.extracting-x.zip/a'" and the temp folder stayed
        with pytest.raises(ArchiveDamaged, match=says):
            extract_archive(z, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob(".extracting-*"))


def test_an_encrypted_member_is_one_error(tmp_path):
    z = bytearray(_zip({"a.jpg": b"secret"}))
    z[6] |= 1  # the local header's "encrypted" flag
    central = z.rindex(b"PK\x01\x02")
    z[central + 8] |= 1  # and the central directory's
    (tmp_path / "x.zip").write_bytes(bytes(z))
    with pytest.raises(ArchiveDamaged, match="cannot be unpacked here .*encrypted"):
        extract_archive(tmp_path / "x.zip", tmp_path / "out", progress=False)


def test_a_member_named_as_the_extraction_record_cannot_mark_archives_done(tmp_path, server, tiny):
    # it overwrote tiny/.extracted.json, marking the other archives "removed earlier": "ready" without them
    forged = {f"{a.filename}:{a.into}:{','.join(a.members)}": {"sha256": "x", "files": 1, "archive_removed": True}
              for a in tiny.archives}
    images = _zip({"train2014/COCO_train2014_000000000009.jpg": IMAGE_A,
                   "train2014/COCO_train2014_000000000025.jpg": IMAGE_B,
                   ".extracted.json": json.dumps(forged).encode(), ".extracting-x/y": b"z"})
    server.files["train2014.zip"] = images
    tiny = DatasetSpec(tiny.name, tiny.description, (Archive(tiny.archives[0].url, len(images)), *tiny.archives[1:]),
                       tiny.images, tiny.captions, tiny.fmt)
    steps = _get(tiny, tmp_path, server)
    assert [s.fetched for s in steps] == ["downloaded"] * 3
    _check_layout(tmp_path)


def test_a_download_cut_short_without_a_length_is_set_aside_and_fetched_again(tmp_path, server, tiny):
    # a zip without its end (the central directory) was "delete it and run again", and stayed recorded as verified
    good = server.files["caption_datasets.zip"]
    server.files["caption_datasets.zip"] = good[: len(good) // 2]  # no published size: only the archive can tell
    with pytest.raises(DownloadError, match=r"caption_datasets.zip is neither a zip nor a tar archive \(cut short\?\): "
                                            r"moved it to caption_datasets.zip.bad .*run again"):
        _get(tiny, tmp_path, server)
    server.files["caption_datasets.zip"] = good
    assert _get(tiny, tmp_path, server)[2].fetched == "downloaded"
    _check_layout(tmp_path)


def test_a_reply_that_is_not_http_is_one_unreachable_error(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)

    def answer():
        conn, _ = sock.accept()
        conn.recv(4096)
        conn.sendall(b"SSH-2.0-OpenSSH_8.9\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    with pytest.raises(DownloadError, match=r"could not reach 127.0.0.1:\d+: BadStatusLine"):
        data.fetch(Archive("http://official.invalid/x.zip"), tmp_path / "archives",
                   mirror=f"http://127.0.0.1:{sock.getsockname()[1]}", progress=False)
    sock.close()


def test_two_downloads_into_one_archives_folder_take_turns(tmp_path, server, tiny):
    from common.lock import LOCK_NAME, OutputBusy, hold

    (tmp_path / "archives").mkdir()
    with hold(tmp_path / "archives" / LOCK_NAME, "archives folder"):  # as another download would
        with pytest.raises(OutputBusy, match="archives folder"):
            _get(tiny, tmp_path, server)
    _get(tiny, tmp_path, server)
    _check_layout(tmp_path)


def test_something_in_the_dataset_folders_way_keeps_the_archive(tmp_path, server, tiny):
    # a clash with what is already in ROOT/NAME is not the archive's fault: it was set aside and fetched again
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "train2014").write_text("a file where the archive has a folder")
    with pytest.raises(DownloadError, match=r"cannot extract 'train2014.*' of .*train2014.zip into .*: .*move what is "
                                            r"in the way aside") as e:
        _get(tiny, tmp_path, server)
    assert "moved it to" not in str(e.value)
    assert (tmp_path / "archives/train2014.zip").is_file() and not (tmp_path / "archives/train2014.zip.bad").exists()
    (tmp_path / "tiny" / "train2014").unlink()
    server.log.clear()
    _get(tiny, tmp_path, server)  # the archive kept is used: train2014.zip is not downloaded again
    assert "train2014.zip" not in [n for n, _ in server.log]
    _check_layout(tmp_path)
