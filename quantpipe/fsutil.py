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
import socket
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
    "owner_tag",
    "remove_orphans",
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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.{owner_tag()}.", suffix=f"{suffix}.tmp", dir=dest.parent)
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


def owner_tag() -> str:
    """`<host>.<pid>` of this process: temporary files and folders carry it in their names, so that one left by a
    process killed outright (SIGKILL, the out-of-memory killer, a power cut) can be told from one still being
    written (remove_orphans)."""
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname()) or "host"
    return f"{host}.{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: asks whether the process exists, sends nothing
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_orphans(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries in `folder` (hidden `*.tmp` files, `*.partial` folders named with owner_tag) whose
    writer ran on this host and is gone: what a run killed outright left behind. Returns what was removed.

    Temporaries of a live process (this one, a run beside it) and of other hosts (a shared file system) are left;
    on Windows nothing is removed (there is no portable way to ask whether a process exists)."""
    root = Path(folder)
    if os.name != "posix" or not root.is_dir():
        return []
    mark = f".{owner_tag().rsplit('.', 1)[0]}."
    removed = []
    for entry in root.iterdir():
        name = entry.name
        if not name.startswith(".") or not name.endswith((".tmp", ".partial")) or mark not in name:
            continue
        pid = name[name.rindex(mark) + len(mark):].split(".", 1)[0]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):  # another run may be sweeping it at the same moment
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


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
