"""quantpipe.backends.tensorrt.version: version dispatch, the status probe and the lazy tensorrt module, without TensorRT."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from quantpipe.backends.tensorrt import version as trt_version
from quantpipe.backends.tensorrt.version import api_for_version, require_tensorrt, tensorrt_status
from quantpipe.errors import EXIT_MISSING_DEPENDENCY, MissingDependencyError


@pytest.mark.parametrize(
    ("version", "weak", "explicit_batch"),
    [("8.6.1.6", True, True), ("10.0.1", True, False), ("10.13.0.35", True, False), ("11.1.0", False, False)],
)
def test_api_for_supported_versions(version: str, weak: bool, explicit_batch: bool) -> None:
    api = api_for_version(version)
    assert (api.weak_typing, api.explicit_batch_flag, api.has_calibrators) == (weak, explicit_batch, weak)


@pytest.mark.parametrize(("version", "match"), [("8.5.3", "needs 8.6"), ("12.0.0", "supports 8.6 - 11"), ("dev", "cannot read")])
def test_api_for_unsupported_versions(version: str, match: str) -> None:
    with pytest.raises(MissingDependencyError, match=match) as info:
        api_for_version(version)
    assert info.value.exit_code == EXIT_MISSING_DEPENDENCY


def test_status_without_tensorrt_never_raises_and_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    available, version, reason = tensorrt_status()
    assert (available, version) == (False, None)
    assert reason is not None and reason.startswith("tensorrt: not installed") and "pip install" in reason
    with pytest.raises(MissingDependencyError, match="not installed") as info:
        require_tensorrt()
    assert info.value.exit_code == EXIT_MISSING_DEPENDENCY


def test_status_with_too_old_or_broken_tensorrt(fake_trt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_trt("8.5.3.1")
    available, version, reason = tensorrt_status()
    assert not available and version == "8.5.3.1" and reason is not None and "8.6" in reason
    broken = types.ModuleType("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", broken)
    available, version, reason = tensorrt_status()
    assert not available and reason is not None and "__version__" in reason


def test_lazy_tensorrt_error_is_the_one_deps_require_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    # version.py cannot import quantpipe.deps (deps imports it), so it words the error itself: keep them equal.
    from quantpipe.deps import require

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError) as lazy:
        trt_version.trt.Builder  # noqa: B018
    with pytest.raises(MissingDependencyError) as door:
        require("tensorrt", purpose="TensorRT engines")
    assert str(lazy.value) == str(door.value) and "pip install 'quantpipe[tensorrt]'" in str(lazy.value)
