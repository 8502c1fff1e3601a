"""Large values sent to each worker once (issue 18): the model, the samples and the recipe a search step's
candidate shares all read.

`executor.stash(value)` pickles the value once in the lead, names it by the sha256 of those bytes and makes the
bytes reachable by the workers: `engine: local` writes them to a file in the pool's own temporary folder (once
per content); `engine: ray` puts them into the object store (once per content, per run). A share then carries
only the small `Stashed` handle. In a worker, `unstash(handle)` returns the value from a per-process cache keyed
by the digest; on a miss it reads the bytes, checks their sha256 against the handle's digest (a stale or
truncated file, or a reused name, is refused with WorkerError, never trusted) and unpickles them. So each worker
reads and unpickles a value once however many shares (and search steps) use it; a value that changes (the next
step's recipe) has another digest and another entry. The cache keeps the `CACHE_ENTRIES` values used last.

The lead pickles and hashes a value once however often it is stashed (`StashBook` remembers the values it saw,
by identity). `InProcess` stashes nothing: its handle holds the value itself (no pickling, no hashing).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantpipe.deps import require
from quantpipe.errors import WorkerError

__all__ = ["CACHE_ENTRIES", "Stashed", "StashBook", "cached_digests", "pack", "stash_file", "unstash"]

CACHE_ENTRIES = 6
"""Values a worker process keeps (the model, the samples and a few steps' recipes)."""

#: This process's values, by digest, least recently used first.
_CACHE: collections.OrderedDict[str, Any] = collections.OrderedDict()


@dataclasses.dataclass(frozen=True)
class Stashed:
    """A handle to a value the workers read once: its digest and where its pickled bytes are."""

    digest: str
    """sha256 (hex) of the pickled bytes; '' for a value held inline."""
    kind: str
    """'inline' (`value` is the value), 'file' (`where` is a path) or 'ray' (`where` is an ObjectRef)."""
    where: Any = None
    value: Any = None
    size: int = 0
    """The pickled bytes' length."""


class StashBook:
    """An executor's record of what it stashed: a handle per content (sha256), and the last `remember` values
    stashed by identity, so a search that stashes the same model and samples at every step pickles and hashes
    them once. The values are held (an id is never reused while remembered) and must not be changed in place
    once stashed: the searches' model, scales and samples are not. A tuple is remembered by its items'
    identities (the searches pass a fresh tuple of the same samples at every step)."""

    def __init__(self, remember: int = 8) -> None:
        self.handles: dict[str, Stashed] = {}
        self._known: collections.OrderedDict[tuple[int, ...], tuple[Any, Stashed]] = collections.OrderedDict()
        self._remember = remember

    def stash(self, value: Any, put: Callable[[bytes, str], Stashed]) -> Stashed:
        """The handle to `value`: remembered, or `put(pickled bytes, digest)` once per content."""
        key = tuple(map(id, value)) if isinstance(value, tuple) else (id(value),)
        known = self._known.get(key)
        if known is not None and (known[0] is value or (isinstance(value, tuple) and len(known[0]) == len(value)
                                                       and all(a is b for a, b in zip(known[0], value, strict=True)))):
            self._known.move_to_end(key)
            return known[1]
        data, digest = pack(value)
        if digest not in self.handles:
            self.handles[digest] = put(data, digest)
        self._known[key] = (value, self.handles[digest])
        while len(self._known) > self._remember:
            self._known.popitem(last=False)
        return self.handles[digest]

    def clear(self) -> None:
        self.handles.clear()
        self._known.clear()


def pack(value: Any) -> tuple[bytes, str]:
    """The value's pickled bytes and their sha256 (hex)."""
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return data, hashlib.sha256(data).hexdigest()


def stash_file(folder: str | os.PathLike[str], data: bytes, digest: str) -> Stashed:
    """Write `data` to `<folder>/<digest>.pkl` unless a file of that name and size is there (atomically: a
    worker never sees half a file), and return its handle."""
    path = Path(folder) / f"{digest}.pkl"
    if not (path.is_file() and path.stat().st_size == len(data)):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return Stashed(digest=digest, kind="file", where=str(path), size=len(data))


def unstash(handle: Stashed) -> Any:
    """The value behind `handle` (in a worker): from this process's cache, else read, verified and unpickled."""
    if handle.kind == "inline":
        return handle.value
    if handle.digest in _CACHE:
        _CACHE.move_to_end(handle.digest)
        return _CACHE[handle.digest]
    data = _read(handle)
    got = hashlib.sha256(data).hexdigest()
    if got != handle.digest:
        raise WorkerError(
            f"a worker read {len(data)} bytes for a shared value ({handle.kind} {handle.where}) whose sha256 is "
            f"{got[:16]}..., not the {handle.digest[:16]}... the lead stashed: the stored copy is stale or damaged "
            f"(another process wrote or truncated it). Nothing was computed from it. Run again; if it repeats, "
            f"check the temporary folder's disk (TMPDIR) or the Ray object store.")
    value = pickle.loads(data)
    _CACHE[handle.digest] = value
    while len(_CACHE) > CACHE_ENTRIES:
        _CACHE.popitem(last=False)
    return value


def cached_digests() -> list[str]:
    """The digests this process holds, least recently used first (for tests and logs)."""
    return list(_CACHE)


def _read(handle: Stashed) -> bytes:
    if handle.kind == "file":
        try:
            return Path(handle.where).read_bytes()
        except OSError as err:
            raise WorkerError(
                f"a worker cannot read the shared value {handle.where} ({err}); the pool's temporary folder was "
                f"removed or is on a disk the worker cannot reach. Run again, with TMPDIR on a local disk.") from err
    if handle.kind == "ray":
        ray = require("ray", purpose="execution.engine: ray")
        data = ray.get(handle.where)
        return bytes(data)
    raise ValueError(f"unknown stash kind {handle.kind!r}")
