"""quantpipe.backends.tensorrt.metadata: an engine built for another TensorRT, GPU or model is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from quantpipe.backends.tensorrt.metadata import GpuInfo, check_engine_metadata, metadata_path_for, read_engine_metadata
from quantpipe.errors import StaleArtifactError
from tests.trt_fakes import GPU, META


def test_metadata_accepts_the_same_machine() -> None:
    check_engine_metadata(META, engine_path="e.engine", tensorrt_version="10.13.0.35", gpu=GPU,
                          source_sha256="a" * 64, engine_sha256="b" * 64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tensorrt_version": "10.3.0"}, r"built with TensorRT 10.13.0.35 on NVIDIA H100.*has TensorRT 10.3.0.*Rebuild"),
        ({"gpu": GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")}, r"built for .*compute 9.0.*A100.*compute 8.0.*specific to the GPU"),
        ({"gpu": GpuInfo("NVIDIA H200", "9.0")}, "specific to the GPU model"),
        ({"source_sha256": "c" * 64}, "built from a model with sha256 aaaaaaaaaaaa"),
        ({"engine_sha256": "d" * 64}, "does not match its metadata"),
    ],
)
def test_metadata_refuses_other_tensorrt_gpu_or_model(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"tensorrt_version": "10.13.0.35", "gpu": GPU}
    args.update(kwargs)
    with pytest.raises(StaleArtifactError, match=match):
        check_engine_metadata(META, engine_path="e.engine", **args)


def test_missing_or_foreign_metadata_is_stale(tmp_path: Path) -> None:
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    with pytest.raises(StaleArtifactError, match="no metadata file m.engine.json"):
        read_engine_metadata(engine)
    metadata_path_for(engine).write_text(json.dumps({"format": 99}))
    with pytest.raises(StaleArtifactError, match="format 1"):
        read_engine_metadata(engine)
