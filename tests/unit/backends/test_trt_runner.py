"""quantpipe.backends.tensorrt.runner without a GPU: the runner checks the engine metadata before it deserializes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from quantpipe.backends.tensorrt import runner as trt_runner
from quantpipe.backends.tensorrt.metadata import metadata_path_for
from quantpipe.backends.tensorrt.runner import TensorRTRunner
from quantpipe.errors import StaleArtifactError
from tests.trt_fakes import GPU, META


def test_runner_refuses_an_engine_from_another_gpu(tmp_path: Path, fake_trt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_trt("10.13.0.35")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"ENGINE")
    meta = dict(META, gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    metadata_path_for(engine).write_text(json.dumps(meta))
    monkeypatch.setattr(trt_runner, "current_gpu", lambda device=0: GPU)
    with pytest.raises(StaleArtifactError, match="A100"), TensorRTRunner(engine, "trt_fp32"):
        pass
