"""Models whose weights live in an external data file (what every > 2 GB model must do): loading without
the weights, reading one tensor on demand, sessions that read the weights from the model's folder, the
writers, the fingerprint, and one-paragraph errors for a missing or truncated data file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from quantpipe import onnxgraph, ortsession
from quantpipe.cli import main
from quantpipe.errors import EXIT_BAD_INPUT, ModelError
from quantpipe.externaldata import BASEPATH, external_data_files, has_external_data, in_memory_bytes
from quantpipe.model import load_model_spec
from quantpipe.onnxgraph import Graph, load_onnx, model_sha256, save_onnx
from quantpipe.ortsession import ort_session
from quantpipe.quantize.fp16 import write_fp16_model
from tests.bigmodel import write_matmul_chain

DIMS = (64, 48, 64, 48, 32)


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    write_matmul_chain(tmp_path / "m", DIMS, samples=6)
    return tmp_path / "m" / "model.onnx"


def _x(n: int = 3) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, DIMS[0]), dtype=np.float32)


def _ref(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_load_keeps_external_weights_out_of_the_proto_and_reads_them_on_demand(chain: Path) -> None:
    m = load_onnx(chain)
    assert has_external_data(m) and in_memory_bytes(m) == 0
    assert external_data_files(m, chain) == [chain.parent / "model.onnx.data"]
    w0 = Graph(m.graph).value("w0")
    full = onnx.load(str(chain))  # onnx's own loader, weights in memory: the same values
    np.testing.assert_array_equal(w0, onnx.numpy_helper.to_array(full.graph.initializer[0]))
    assert not has_external_data(load_onnx(chain, external_data=True))


def test_session_reads_weights_from_the_models_folder_without_a_copy(chain: Path, monkeypatch) -> None:
    x = _x()
    m = load_onnx(chain)
    np.testing.assert_array_equal(ort_session(m).run(None, {"x": x})[0], _ref(chain, x))
    # A proto too large to serialise goes through a temporary file: the references are linked, not copied.
    monkeypatch.setattr(ortsession, "LARGE_MODEL_BYTES", 0)
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(300, np.float32), "unused"))
    np.testing.assert_array_equal(ort_session(m).run(None, {"x": x})[0], _ref(chain, x))
    assert has_external_data(m)  # the caller's model still references the model's own file


@pytest.mark.parametrize("large", [False, True])
def test_save_writes_external_references_into_the_new_model(chain: Path, tmp_path: Path, monkeypatch,
                                                            large: bool) -> None:
    if large:
        monkeypatch.setattr(onnxgraph, "LARGE_MODEL_BYTES", 1000)
    out = tmp_path / "out" / "copy.onnx"
    save_onnx(load_onnx(chain), out)
    assert (tmp_path / "out" / "copy.onnx.data").is_file() == large
    np.testing.assert_array_equal(_ref(out, _x()), _ref(chain, _x()))
    for t in onnx.load(str(out), load_external_data=False).graph.initializer:  # no folder recorded in the file
        assert BASEPATH not in {e.key for e in t.external_data}


def test_fp16_writer_on_an_external_data_model(chain: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.fp16.onnx"
    write_fp16_model(chain, out)
    fp16 = onnx.load(str(out))
    assert {t.data_type for t in fp16.graph.initializer} == {TensorProto.FLOAT16}
    got, ref = _ref(out, _x()), _ref(chain, _x())
    assert np.max(np.abs(got - ref)) < 0.02 * np.max(np.abs(ref))


def test_fingerprint_covers_the_external_data_file(chain: Path) -> None:
    spec, _ = load_model_spec(chain)
    before = model_sha256(chain)
    assert spec.sha256 == before
    assert spec.size_bytes == chain.stat().st_size + (chain.parent / "model.onnx.data").stat().st_size
    data = chain.parent / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[5] ^= 0x40  # one weight changes; the .onnx file does not
    data.write_bytes(bytes(raw))
    assert model_sha256(chain) != before


def test_missing_or_truncated_data_file_is_a_model_error(chain: Path, capsys) -> None:
    data = chain.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelError, match="truncated"):
        load_onnx(chain)
    os.remove(data)
    with pytest.raises(ModelError, match="model.onnx.data', which is missing"):
        load_model_spec(chain)
    # Through the CLI: exit 2 with the one-paragraph message, no traceback.
    code = main(["calibrate", str(chain.parent / "pipeline.yaml"), "-q"])
    err = " ".join(capsys.readouterr().err.split())  # as wrapped at the console's width
    assert code == EXIT_BAD_INPUT
    assert "which is missing" in err and "Traceback" not in err
    assert main(["inspect", str(chain)]) == EXIT_BAD_INPUT


def test_inspect_reads_an_external_data_model(chain: Path, capsys) -> None:
    assert main(["inspect", str(chain)]) == 0
    assert "MatMul" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--data", "calib.npz", "--method", "minmax"], ["--fp16"]])
def test_standalone_quantize_on_an_external_data_model(chain: Path, tmp_path: Path, flags: list[str]) -> None:
    out = tmp_path / "out.onnx"
    data = [f if f != "calib.npz" else str(chain.parent / f) for f in flags]
    assert main(["quantize", "--model", str(chain), *data, "--out", str(out), "-q"]) == 0
    got, ref = _ref(out, _x()), _ref(chain, _x())
    assert np.max(np.abs(got - ref)) < 0.1 * np.max(np.abs(ref))
