"""kwjax.files: the content arrives whole, no temporary file stays behind, and a write that fails
half way leaves the file that was there before; the JSON-lines reader numbers lines as an editor does."""

from __future__ import annotations

import numpy as np
import pytest

from kwjax.files import atomic_path, atomic_save_npy, atomic_write_bytes, atomic_write_text, jsonl_objects


def test_writes_arrive_and_leave_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.json", "héllo 가나")  # parent directories are created
    atomic_write_bytes(tmp_path / "c.bin", b"\x00\x01\x02")
    atomic_save_npy(tmp_path / "d.npy", np.arange(6.0).reshape(2, 3))
    assert (tmp_path / "a" / "b.json").read_text(encoding="utf-8") == "héllo 가나"
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01\x02"
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), np.arange(6.0).reshape(2, 3))
    names = sorted(p.name for p in tmp_path.rglob("*"))
    assert names == ["a", "b.json", "c.bin", "d.npy"]  # np.save added no second suffix; no temporaries


def test_overwrite_replaces_whole_content(tmp_path):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "a much longer first version")
    atomic_write_text(path, "short")
    assert path.read_text() == "short"


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write("half of the new ")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with pytest.raises(TypeError):
        atomic_write_text(path, b"not text")  # the writer raises after the temporary file is open
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_failure_without_old_file_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_jsonl_objects_skip_blank_lines_and_name_the_bad_one():
    text = '{"a": 1}\n\n  \n[2, 3]\n"x"\n'
    assert list(jsonl_objects(text, lambda n, e: ValueError(n))) == [(1, {"a": 1}), (4, [2, 3]), (5, "x")]

    class Bad(Exception):
        pass

    with pytest.raises(Bad, match=r"^line 3: Expecting"):
        list(jsonl_objects('{}\n\n{"b": }\n{}', lambda n, e: Bad(f"line {n}: {e.msg}")))
