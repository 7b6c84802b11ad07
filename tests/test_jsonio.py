"""The bounded JSON reader: FIFOs, size, depth and shape are one JSONFileError naming the file."""
import json
import os
import threading

import pytest

from common.jsonio import JSONFileError, iter_jsonl, read_json


def test_reads_a_plain_file_with_a_bom(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": [1, 2]}).encode())
    assert read_json(p, expect=dict) == {"a": [1, 2]}


def test_a_fifo_is_refused_without_blocking(tmp_path):
    p = tmp_path / "x.json"
    os.mkfifo(p)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("e", pytest.raises(JSONFileError, read_json, p)))
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert "not a regular file" in str(out["e"].value)


def test_size_depth_and_type_are_bounded(tmp_path):
    big = tmp_path / "big.json"
    big.write_text("[" + "1," * 1000 + "1]")
    with pytest.raises(JSONFileError, match="larger than"):
        read_json(big, max_bytes=100)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(JSONFileError, match="deeper"):
        read_json(deep)
    shallow_but_over = tmp_path / "d40.json"
    shallow_but_over.write_text("[" * 40 + "]" * 40)
    with pytest.raises(JSONFileError, match="deeper"):
        read_json(shallow_but_over)
    with pytest.raises(JSONFileError, match="must be a JSON object, not array"):
        read_json(big, expect=dict)
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff{")
    with pytest.raises(JSONFileError, match=str(bad)):
        read_json(bad)


def test_jsonl_rows_lines_and_torn_tail(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"a": 1}\n\n[1]\n{"a": 2}\n{"a": ')
    with pytest.raises(JSONFileError, match="line 3"):
        list(iter_jsonl(p))
    assert [row for _, row in iter_jsonl(p, skip_bad=True)] == [{"a": 1}, {"a": 2}]
    long = tmp_path / "long.jsonl"
    long.write_text('{"a": "' + "x" * 200 + '"}\n{"b": 1}\n')
    with pytest.raises(JSONFileError, match="longer than"):
        list(iter_jsonl(long, max_line_bytes=100))
    assert [row for _, row in iter_jsonl(long, max_line_bytes=100, skip_bad=True)] == [{"b": 1}]
