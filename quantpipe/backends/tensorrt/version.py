"""Which TensorRT is installed and what its version offers; the lazy `tensorrt` module every other TensorRT module uses.

The installed TensorRT picks the build path: 8.6 - 10.x is weakly typed (builder flags, IInt8 calibrators),
11.x strongly typed only (NVIDIA's 10.x -> 11.x migration guide). Everything here is decided from the
version string, without touching TensorRT.

This module imports only the standard library and `quantpipe.errors`: `quantpipe.deps` imports it (to probe
TensorRT for `quantpipe doctor`), so it must not import deps back.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from types import ModuleType
from typing import TYPE_CHECKING, Any

from quantpipe.errors import MissingDependencyError, QuantpipeError

__all__ = [
    "INSTALL_TENSORRT",
    "MIN_VERSION",
    "UNSUPPORTED_MAJOR",
    "TrtApi",
    "api_for_version",
    "import_tensorrt",
    "require_tensorrt",
    "tensorrt_status",
    "trt",
]

#: Oldest TensorRT this module supports: the name-based tensor API (set_tensor_address,
#: execute_async_v3) and memory-pool limits it relies on are complete from 8.6.
MIN_VERSION = (8, 6)
#: First major version this module does not know (its removals are not in the migration guide yet).
UNSUPPORTED_MAJOR = 12

INSTALL_TENSORRT = "pip install 'quantpipe[tensorrt]'  (or: pip install tensorrt)"


def import_tensorrt() -> ModuleType:
    """The tensorrt module, or MissingDependencyError with the pip command.

    The same error, word for word, as `quantpipe.deps.require("tensorrt", purpose="TensorRT engines")`
    (a unit test compares them): deps imports this module, so this module cannot import deps.
    """
    try:
        return importlib.import_module("tensorrt")
    except ImportError as err:
        raise MissingDependencyError(
            f"TensorRT engines needs the Python module 'tensorrt', which cannot be imported here "
            f"({type(err).__name__}: {err}). Install it with: {INSTALL_TENSORRT} (quantpipe extra 'tensorrt')."
        ) from err


class _LazyTensorRT:
    """Stands in for the tensorrt module until an attribute is used; then imports it (`import_tensorrt`)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(import_tensorrt(), name)


if TYPE_CHECKING:  # mypy checks every use of `trt` against stubs of the real bindings (tools/trt_bindings.py mypy)
    import tensorrt as trt
else:
    trt = _LazyTensorRT()


def tensorrt_status() -> tuple[bool, str | None, str | None]:
    """(available, version, reason it is not) for the installed TensorRT. Never raises.

    The reason is one line for a skipped variant, e.g. "tensorrt: not installed (...); install with ...".
    """
    try:
        try:
            mod = importlib.import_module("tensorrt")
        except Exception as err:  # missing module, or a wheel whose native libraries fail to load
            return False, None, f"tensorrt: not installed ({type(err).__name__}: {err}); install with: {INSTALL_TENSORRT}"
        version = getattr(mod, "__version__", None)
        if not isinstance(version, str) or not version:
            return False, None, "tensorrt: the module imports but reports no __version__ (a broken install?); reinstall it"
        try:
            api_for_version(version)
        except QuantpipeError as err:
            return False, version, str(err)
        return True, version, None
    except Exception as err:  # pragma: no cover - the promise is "never raises"
        return False, None, f"tensorrt: probing failed ({type(err).__name__}: {err})"


def require_tensorrt(required_by: str | None = None) -> TrtApi:
    """The installed TensorRT's API level, or MissingDependencyError (exit 3) saying why and how to fix it;
    `required_by`: the setting that asked for it, said first with the way out (found probing: the exit-3 message
    named neither where TensorRT was required nor the alternative)."""
    available, version, reason = tensorrt_status()
    if not available or version is None:
        why = reason or "tensorrt: not available"
        if required_by:
            why = (f"{required_by} is true, but TensorRT is missing here ({why}). Run on a machine with an NVIDIA GPU "
                   f"and TensorRT, or set {required_by}: false to report the TensorRT variants as skipped.")
        raise MissingDependencyError(why)
    return api_for_version(version)


@dataclasses.dataclass(frozen=True)
class TrtApi:
    """What the installed TensorRT offers, decided from its version alone."""

    version: str
    major: int
    minor: int
    weak_typing: bool
    """BuilderFlag.FP16 / INT8 and the IInt8 calibrators exist (<= 10.x; removed in 11.0)."""
    explicit_batch_flag: bool
    """Networks must be created with NetworkDefinitionCreationFlag.EXPLICIT_BATCH (< 10.0)."""

    @property
    def strongly_typed_only(self) -> bool:
        return not self.weak_typing

    @property
    def has_calibrators(self) -> bool:
        return self.weak_typing


_VERSION_RE = re.compile(r"^\s*(\d+)\.(\d+)")


def api_for_version(version: str) -> TrtApi:
    """The API level of TensorRT `version` ("10.13.0.35", "11.1.0", "8.6.1.post1" ...).

    Raises MissingDependencyError for versions this module does not support.
    """
    m = _VERSION_RE.match(version)
    if m is None:
        raise MissingDependencyError(f"tensorrt: cannot read the version string {version!r}; reinstall TensorRT ({INSTALL_TENSORRT})")
    major, minor = int(m.group(1)), int(m.group(2))
    if (major, minor) < MIN_VERSION:
        raise MissingDependencyError(
            f"tensorrt: version {version} is installed; quantpipe needs 8.6 or newer (the name-based tensor API). "
            f"Upgrade with: pip install 'tensorrt>=8.6,<{UNSUPPORTED_MAJOR}'"
        )
    if major >= UNSUPPORTED_MAJOR:
        raise MissingDependencyError(
            f"tensorrt: version {version} is installed; quantpipe supports 8.6 - 11.x (TensorRT {major} may remove "
            f"APIs quantpipe uses). Install a supported one with: pip install 'tensorrt>=8.6,<{UNSUPPORTED_MAJOR}'"
        )
    return TrtApi(version=version, major=major, minor=minor, weak_typing=major <= 10, explicit_batch_flag=major < 10)
