"""Fixtures of the TensorRT unit tests: a fake `tensorrt` module installed in sys.modules for one test."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.trt_fakes import make_fake_trt


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Install a fake tensorrt of a given version: fake_trt("10.13.0") -> record dict."""

    def install(version: str) -> dict[str, Any]:
        record: dict[str, Any] = {}
        monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(version, record))
        return record

    yield install
