"""Crash-safe JSON lines: no valid record is ever lost or glued to another, damaged lines are set aside."""

from __future__ import annotations

import json

import pytest

from conftest import unwritable_dir
from namm.errors import NammError
from namm.jsonl import append_record, bad_lines_file, read_records, writable_dir


def lines(path):
    return path.read_text().splitlines()


def test_a_missing_final_newline_never_glues_two_records(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "0"}\n{"id": "1"}')  # the last record lacks its newline
    append_record(path, {"id": "2"})
    assert [json.loads(line)["id"] for line in lines(path)] == ["0", "1", "2"]
    found = read_records(path)
    assert [r["id"] for r in found.records] == ["0", "1", "2"] and found.set_aside == 0 and found.message is None
    path.write_text('{"id": "0"}')  # reading adds the newline, so any later writer appends cleanly
    assert [r["id"] for r in read_records(path).records] == ["0"]
    assert path.read_text() == '{"id": "0"}\n'


def test_a_corrupt_middle_line_is_set_aside_and_every_valid_record_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "0"}\n{"id": "1", "sco\n{"id": "2"}\n[1, 2]\n\n{"id": "3"}\n{"id": "4", "torn')
    found = read_records(path)
    assert [r["id"] for r in found.records] == ["0", "2", "3"]
    assert found.set_aside == 3  # the damaged line, a non-object and the torn last line
    assert str(bad_lines_file(path)) in found.message and "3 unreadable lines" in found.message
    assert "3 valid records are kept" in found.message
    assert lines(bad_lines_file(path)) == ['{"id": "1", "sco', "[1, 2]", '{"id": "4", "torn']
    assert lines(path) == ['{"id": "0"}', '{"id": "2"}', '{"id": "3"}']  # rewritten with the valid lines only
    again = read_records(path)
    assert again.set_aside == 0 and [r["id"] for r in again.records] == ["0", "2", "3"]
    before = path.read_bytes()
    path.write_text(before.decode() + "garbage\n")
    assert read_records(path, repair=False).set_aside == 1 and "garbage" in path.read_text()  # left untouched


def test_missing_file(tmp_path):
    assert read_records(tmp_path / "none.jsonl").records == []
    assert list(tmp_path.iterdir()) == []


def test_writable_dir_refuses_files_and_read_only_folders(tmp_path):
    assert writable_dir(tmp_path / "a" / "b", "--out").is_dir()  # created, parents too
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(NammError, match="--out .*file is a file; give a directory"):
        writable_dir(file, "--out")
    with pytest.raises(NammError, match="is not a writable directory"):
        writable_dir(file / "sub", "--out")
    with pytest.raises(NammError, match="--out .* is not a writable directory"):
        writable_dir(unwritable_dir(tmp_path), "--out")
