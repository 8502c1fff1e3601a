"""Atomic file writes and content hashes.

Every artifact quantpipe writes goes to a temporary name in the destination folder and is renamed
into place only once complete, so an interrupted run never leaves a half cache or engine behind that
a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_copy",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "sha256_file",
    "sha256_bytes",
    "writable_reason",
]


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` when the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary file is removed and `dest` is left
    as it was. `suffix` keeps an extension some writers insist on (e.g. ".onnx").
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f"{suffix}.tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; artifacts get the permissions a plain open() would give them.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `dest` atomically and return `dest`."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(dest)


def atomic_write_text(dest: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 `text` to `dest` atomically and return `dest`."""
    return atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_write_json(dest: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` as indented, key-sorted JSON atomically and return `dest`."""
    return atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_copy(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Copy `src`'s bytes to `dest` atomically (a new file, never a link to `src`) and return `dest`.

    A copy, not a hard link: a link shares the inode, so an in-place write to either name would change
    the other; a published file must not change when its source does. shutil.copyfile uses the
    kernel's copy (copy_file_range / sendfile) where it can.
    """
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dest)


def writable_reason(folder: str | os.PathLike[str]) -> str | None:
    """None when files can be created in `folder` (made if missing), else why not (the OS's words).

    Probes by creating and removing a file: permission bits alone do not tell (root, read-only
    mounts, ACLs, quotas).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".quantpipe-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(folder) else ""
        return f"{err.strerror or err}{where}"
    return None
