"""The one atomic-write helper: whole or absent, never through a planted link, errors name the file."""
from __future__ import annotations

import os

import pytest

from common.atomic import AtomicWriteError, atomic_path, atomic_write


def test_writes_whole_file_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "a.json"
    atomic_write(out, '{"x": 1}')
    assert out.read_text() == '{"x": 1}'
    assert os.listdir(tmp_path) == ["a.json"]


def test_links_planted_beside_the_target_are_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "e.json"
    for name in ("e.json.tmp", ".e.json.tmp"):  # the names older writers used
        (tmp_path / name).symlink_to(victim)
    atomic_write(out, "new")
    assert victim.read_text() == "precious" and out.read_text() == "new"


def test_a_symlink_at_the_target_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.txt"
    out.symlink_to(victim)
    atomic_write(out, b"new")
    assert victim.read_text() == "precious" and not out.is_symlink() and out.read_bytes() == b"new"


def test_a_failing_writer_keeps_the_previous_file_and_removes_its_temporary(tmp_path):
    out = tmp_path / "m.txt"
    out.write_text("old")

    def boom(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(AtomicWriteError, match=r"cannot write metrics .*m\.txt: No space left on device"):
        atomic_write(out, boom, what="metrics")
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["m.txt"]


def test_atomic_path_for_writers_that_need_a_name(tmp_path):
    out = tmp_path / "f.bin"
    with atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        tmp.write_bytes(b"abc")
    assert out.read_bytes() == b"abc" and os.listdir(tmp_path) == ["f.bin"]
    with pytest.raises(AtomicWriteError, match="cannot write"):
        atomic_write(tmp_path / "missing" / "x", "y")


def test_a_device_pipe_or_name_in_dev_is_refused_not_replaced(tmp_path):
    """`--json-out /dev/stdout` (as root) replaced the link /dev/stdout with a file, and /dev/full with one:
    a device, a pipe, a link to one or a name in /dev is refused, before and at the write."""
    import os

    from common.atomic import AtomicWriteError, ready_to_write

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "to-fifo").symlink_to(fifo)
    for target in (fifo, tmp_path / "to-fifo"):
        for write in (lambda: ready_to_write(target, "report"), lambda: atomic_write(target, "x", "report")):
            with pytest.raises(AtomicWriteError, match="device, pipe or socket, not a file"):
                write()
        assert target.is_fifo()
    with pytest.raises(AtomicWriteError, match="a name in /dev"):
        ready_to_write("/dev/null", "report")  # the check alone: it writes nothing, also if it were wrong
