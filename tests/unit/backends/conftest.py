"""Fixtures of the TensorRT unit tests: a fake `tensorrt` module installed in sys.modules for one test, and the
real bindings of each claimed version in a subprocess (tests/trt_real.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.trt_fakes import make_fake_trt
from tests.trt_real import RealTrt, tool
from tests.trt_real import real_trt as real_trt_for


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Install a fake tensorrt of a given version: fake_trt("10.13.0") -> record dict."""

    def install(version: str) -> dict[str, Any]:
        record: dict[str, Any] = {}
        monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(version, record))
        return record

    yield install


@pytest.fixture(params=list(tool().VERSIONS), scope="session")
def real_trt(request: pytest.FixtureRequest) -> RealTrt:
    """Each TensorRT version tools/trt_bindings.py claims, as its real bindings in a subprocess (skipped with the
    reason where they cannot be prepared)."""
    return real_trt_for(request.param)
