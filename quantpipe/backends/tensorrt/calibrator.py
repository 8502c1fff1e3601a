"""Implicit INT8 calibration for TensorRT <= 10: quantpipe's IInt8EntropyCalibrator2 / IInt8MinMaxCalibrator.

`CalibrationFeed` holds the logic (quantpipe's cache first, else device batches from `quantpipe.cuda`),
with no tensorrt in it; `make_calibrator` wraps it in the TensorRT subclass for the method. TensorRT 11
removed these calibrators: INT8 engines come only from the Q/DQ model there.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from quantpipe.backends.tensorrt.version import require_tensorrt, trt
from quantpipe.calibration import cache as qcache
from quantpipe.cuda import AllocatorKind, BatchSource, DeviceAllocator, DeviceBatcher
from quantpipe.errors import BuildError, CalibrationError, QuantpipeError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["CACHE_ALGORITHM", "CalibrationFeed", "CalibrationInput", "CalibrationMethod", "make_calibrator"]

log = logging.getLogger(__name__)

CalibrationMethod = Literal["entropy", "minmax"]

#: TensorRT's cache-header name of each implicit-calibration algorithm.
CACHE_ALGORITHM: dict[str, str] = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration"}


@dataclasses.dataclass(frozen=True)
class CalibrationInput:
    """What implicit INT8 calibration (TensorRT <= 10, int8_mode 'calibrator') needs.

    With `cache_path` pointing at quantpipe's TensorRT cache for `method`, TensorRT reads those scales and
    does not calibrate (no data is copied to the device). With `fingerprint` (what the calibrate stage
    expects: `quantpipe.calibration.cache.make_fingerprint`), the cache and its sidecar are checked first
    and a stale one is refused. Otherwise TensorRT calibrates on `dataset`, and its cache is written to
    `cache_path` (through quantpipe's cache module) when `write_cache`.
    """

    method: CalibrationMethod = "entropy"
    cache_path: Path | None = None
    dataset: BatchSource | None = None
    batch_size: int = 32
    allocator: AllocatorKind | DeviceAllocator = "auto"
    max_batches: int | None = None
    write_cache: bool = True
    fingerprint: Mapping[str, str] | None = None


class CalibrationFeed:
    """The logic behind both TensorRT calibrator classes, with no tensorrt in it.

    TensorRT calls the calibrator from C++ and only prints what a Python override raises, so every
    failure here is kept in `errors`; `build_engine` raises the first one after the build returns.
    """

    def __init__(
        self,
        *,
        method: CalibrationMethod,
        tensorrt_version: str,
        batcher: DeviceBatcher | None = None,
        cache_path: str | Path | None = None,
        write_cache: bool = True,
        fingerprint: Mapping[str, str] | None = None,
    ) -> None:
        if method not in CACHE_ALGORITHM:
            raise CalibrationError(f"TensorRT implicit calibration supports methods {sorted(CACHE_ALGORITHM)}, not {method!r}")
        self.method: CalibrationMethod = method
        self.algorithm = CACHE_ALGORITHM[method]
        self.tensorrt_version = tensorrt_version
        self.batcher = batcher
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.write_cache_enabled = write_cache
        self.fingerprint = dict(fingerprint) if fingerprint is not None else None
        self.errors: list[BaseException] = []
        self.served_cache = False
        self.wrote_cache: Path | None = None
        self._cache_bytes: bytes | None = None
        self._loaded = False

    # -- before the build ---------------------------------------------------------------------------

    def load_cache(self) -> bytes | None:
        """Read and check quantpipe's cache now (outside TensorRT's callbacks, so errors raise normally).

        Returns the bytes TensorRT will be given, with the header written for the installed version, or
        None when there is no cache (or one for another method, which TensorRT would ignore): then
        TensorRT calibrates, and `missing_data_error()` says what to do when there is no data either.
        """
        self._loaded = True
        self._cache_bytes = None
        if self.cache_path is not None and self.cache_path.is_file():
            try:
                if self.fingerprint is not None:  # also refuses a stale cache (StaleArtifactError)
                    parsed = qcache.load_cache(self.cache_path, self.fingerprint).cache
                else:
                    parsed = qcache.read_trt_cache(self.cache_path)
            except QuantpipeError:
                raise
            except Exception as err:
                raise CalibrationError(f"calibration cache {self.cache_path} is unreadable ({err}); delete it to recalibrate") from err
            if parsed.algorithm != self.algorithm:
                log.warning(
                    "calibration cache %s holds %s scales but the %s calibrator needs %s; TensorRT will calibrate itself",
                    self.cache_path, parsed.algorithm, self.method, self.algorithm,
                )
            else:
                self._cache_bytes = self._rewrite_for_installed(parsed.amax)
        return self._cache_bytes

    def missing_data_error(self) -> CalibrationError:
        """The error for "TensorRT must calibrate, but there is no data"."""
        where = f" ({self.cache_path} does not exist)" if self.cache_path is not None and not self.cache_path.is_file() else ""
        return CalibrationError(
            f"INT8 through TensorRT's {self.method} calibrator needs quantpipe's calibration cache for that method or "
            f"calibration data; neither was given{where}. Run `quantpipe calibrate` first, or pass the calibration data."
        )

    def _rewrite_for_installed(self, amax: Mapping[str, float]) -> bytes:
        # TensorRT checks the cache header against its own version and algorithm; quantpipe's scales are
        # the same whatever the version, so the header is rewritten for the TensorRT that reads it
        # (scale * 127 / 127 gives back the same float32 scale).
        with tempfile.TemporaryDirectory(prefix="quantpipe-trtcache-") as tmp:
            path = Path(tmp) / "calibration.cache"
            qcache.write_trt_cache(path, amax, method=self.method, trt_version=self.tensorrt_version)
            return path.read_bytes()

    # -- what TensorRT calls ------------------------------------------------------------------------

    def get_batch_size(self) -> int:
        # For explicit-batch networks TensorRT takes the batch from the input shapes; the size returned here
        # must still match the batches fed, which is what the batcher guarantees.
        return self.batcher.batch_size if self.batcher is not None else 1

    def get_batch(self, names: Sequence[str]) -> list[int] | None:
        if self.batcher is None:
            return None
        try:
            return self.batcher.next_batch(list(names))
        except BaseException as err:  # never let an exception cross into TensorRT's C++ caller
            self.errors.append(err)
            return None

    def read_cache(self) -> bytes | None:
        try:
            if not self._loaded:
                self.load_cache()
            self.served_cache = self._cache_bytes is not None
            return self._cache_bytes
        except BaseException as err:
            self.errors.append(err)
            return None

    def write_cache(self, data: bytes) -> None:
        if self.served_cache or not self.write_cache_enabled or self.cache_path is None:
            return
        try:
            with tempfile.TemporaryDirectory(prefix="quantpipe-trtcache-") as tmp:
                raw = Path(tmp) / "tensorrt.cache"
                raw.write_bytes(bytes(data))
                parsed = qcache.read_trt_cache(raw)
            qcache.write_trt_cache(self.cache_path, parsed.amax, method=self.method, trt_version=self.tensorrt_version)
            self.wrote_cache = self.cache_path
        except BaseException as err:
            self.errors.append(err)

    # -- after the build ----------------------------------------------------------------------------

    def raise_if_failed(self) -> None:
        if self.errors:
            err = self.errors[0]
            if isinstance(err, QuantpipeError):
                raise err
            raise CalibrationError(f"TensorRT calibration failed in quantpipe's calibrator: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


class _FeedForwarding:
    """The four methods TensorRT calls on a calibrator, forwarded to `self.feed`: mixed into both TensorRT subclasses.

    A plain class (no tensorrt in it) placed before the binding's base, so these override the binding's methods
    (pybind11's trampolines find a Python override by ordinary attribute lookup, mixins included: the conformance
    test calls the binding's own `get_batch_size`, which reaches ours through TensorRT's C++ virtual). No
    `__init__` here: see `make_calibrator`.
    """

    feed: CalibrationFeed

    def get_batch_size(self) -> int:
        return self.feed.get_batch_size()

    def get_batch(self, names: Sequence[str]) -> list[int]:
        # The real `get_batch(names: Sequence[str]) -> list[int]`: device pointers, or [] once the data is exhausted
        # (the binding's docstring: "an empty list if there are no more batches"; it treats None the same).
        batch = self.feed.get_batch(names)
        return batch if batch is not None else []

    def read_calibration_cache(self) -> bytes | None:
        # None although the bindings type it `-> Buffer`: None is how the method's own docstring says "no cache:
        # calibrate" (the binding checks for None before reading a buffer); an empty buffer is not documented to
        # mean the same. Hence each subclass names this method itself, with the one `ignore[assignment]`: so mypy
        # reports that mismatch there alone and still checks the other three methods against each base.
        return self.feed.read_cache()

    def write_calibration_cache(self, cache: Buffer) -> None:
        self.feed.write_cache(bytes(cache))


# ignore[name-defined, unused-ignore]: TensorRT 11 has no IInt8Calibrator; mypy's 11.x run sees this annotation
# (never evaluated: `from __future__ import annotations`), the <= 10 runs check it (tools/trt_bindings.py mypy).
def make_calibrator(feed: CalibrationFeed) -> trt.IInt8Calibrator:  # type: ignore[name-defined, unused-ignore]
    """A TensorRT calibrator object delegating to `feed`: IInt8EntropyCalibrator2 or IInt8MinMaxCalibrator.

    The subclasses are defined here, after tensorrt is imported, so this module imports without it. Each one
    overrides the real base's methods with their real signatures (tests/unit/backends/test_trt_conformance.py
    checks them against the bindings of every claimed version; mypy checks them against stubs generated from
    those bindings).
    """
    api = require_tensorrt()
    # mypy's 11.x run treats `has_calibrators` as always false and skips this block (the names are gone there).
    if api.has_calibrators:
        # _FeedForwarding comes first so that its methods override the binding's; each class still calls its own
        # pybind11 base's __init__ by name (pybind11's rule for trampolines: not super(), which follows Python's
        # MRO through the mixin; without the call the C++ object does not exist and TensorRT crashes later).

        class EntropyCalibrator2(_FeedForwarding, trt.IInt8EntropyCalibrator2):
            """quantpipe's entropy calibrator: TensorRT's IInt8EntropyCalibrator2 fed by a CalibrationFeed."""

            def __init__(self, feed: CalibrationFeed) -> None:
                trt.IInt8EntropyCalibrator2.__init__(self)
                self.feed = feed

            read_calibration_cache = _FeedForwarding.read_calibration_cache  # type: ignore[assignment]  # see the mixin

        class MinMaxCalibrator(_FeedForwarding, trt.IInt8MinMaxCalibrator):
            """quantpipe's minmax calibrator: TensorRT's IInt8MinMaxCalibrator fed by a CalibrationFeed."""

            def __init__(self, feed: CalibrationFeed) -> None:
                trt.IInt8MinMaxCalibrator.__init__(self)
                self.feed = feed

            read_calibration_cache = _FeedForwarding.read_calibration_cache  # type: ignore[assignment]  # see the mixin

        calibrator: trt.IInt8Calibrator = EntropyCalibrator2(feed) if feed.method == "entropy" else MinMaxCalibrator(feed)
        return calibrator
    raise BuildError(f"TensorRT {api.version} has no IInt8 calibrators (removed in 11.0); build INT8 from the Q/DQ model")
