"""mypy against stubs generated from the real bindings (tools/trt_bindings.py mypy) catches TensorRT misuse.

`.ci/run` type-checks quantpipe/backends/tensorrt and quantpipe/cuda.py once per version family; these tests
prove that run would fail on the two misuses issue 16 names, by checking small modules the same way.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.trt_real import real_trt, tool

CALIBRATOR = '''
from collections.abc import Sequence
import tensorrt as trt

class Calibrator(trt.IInt8EntropyCalibrator2):
    def get_batch(self, names: Sequence[str]) -> list[str]:   # misuse: TensorRT wants device pointers (list[int])
        return list(names)
'''

FLAG_ON_11_PATH = '''
import tensorrt as trt

def configure(plan: object, config: trt.IBuilderConfig, strongly_typed: bool) -> None:
    if strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)   # misuse: 11.x removed BuilderFlag.INT8
'''


def _mypy(key: str, source: str, tmp_path: Path) -> str:
    real_trt(key)  # skips, with the reason, where the bindings cannot be prepared
    target = tmp_path / "misuse.py"
    target.write_text(source)
    cmd, env = tool().mypy_command(tool().VERSIONS[key], [str(target)])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("key", ["10", "8.6"])
def test_a_wrong_get_batch_return_type_fails_mypy(key: str, tmp_path: Path) -> None:
    out = _mypy(key, CALIBRATOR, tmp_path)
    assert 'Return type "list[str]" of "get_batch" incompatible with return type "list[int]"' in out, out


def test_a_flag_removed_in_11_fails_mypy_on_the_11_stubs(tmp_path: Path) -> None:
    out = _mypy("11", FLAG_ON_11_PATH, tmp_path)
    assert 'has no attribute "INT8"' in out, out
    assert "misuse.py:6" in out, out
