"""Atomic writes: an interrupted write leaves the old file (or nothing), never half a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantpipe.fsutil import atomic_path, atomic_write_json, atomic_write_text, sha256_file


def test_atomic_write_replaces(tmp_path: Path) -> None:
    p = tmp_path / "a" / "b.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in p.parent.iterdir()] == ["b.txt"]


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "cache.bin"
    with pytest.raises(KeyboardInterrupt), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_old(tmp_path: Path) -> None:
    dest = tmp_path / "cache.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_bytes(b"new but broken")
        raise RuntimeError("boom")
    assert dest.read_bytes() == b"old"


def test_json_refuses_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"v": float("nan")})
    assert not (tmp_path / "x.json").exists()


def test_sha256(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_atomic_copy_is_a_copy_not_a_link(tmp_path: Path) -> None:
    import os

    from quantpipe.fsutil import atomic_copy

    src = tmp_path / "src.cache"
    src.write_text("scales")
    dest = atomic_copy(src, tmp_path / "run" / "src.cache")
    assert os.stat(src).st_ino != os.stat(dest).st_ino
    with open(src, "r+") as fh:  # an in-place write to the source leaves the copy alone
        fh.write("SCALES")
    assert dest.read_text() == "scales"


def test_writable_reason(tmp_path: Path) -> None:
    from quantpipe.fsutil import writable_reason

    assert writable_reason(tmp_path / "new" / "folder") is None and (tmp_path / "new" / "folder").is_dir()
    (tmp_path / "file").write_text("x")
    reason = writable_reason(tmp_path / "file" / "reports")
    assert reason is not None and "Not a directory" in reason
    assert list((tmp_path / "new" / "folder").iterdir()) == []  # the probe leaves nothing behind
