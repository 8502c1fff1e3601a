"""Models with external data, built on the fly: a chain of MatMuls whose weights live in one `.data` file
beside the model, written weight by weight (the builder never holds the whole model in memory).

`write_matmul_chain(folder, dims)` makes `model.onnx` + `model.onnx.data`, a calibration and an evaluation
`.npz`, and a `pipeline.yaml` that runs only the onnxruntime variants on the CPU. With the default dims,
four 16384x9216 / 9216x16384 float32 weights, the model is 2.4 GB (2.25 GiB): over protobuf's 2 GiB limit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["LARGE_DIMS", "write_matmul_chain"]

#: x[N, 16384] -> 9216 -> 16384 -> 9216 -> 16384: four weights of 151 M floats each, 2.42 GB in all.
LARGE_DIMS: tuple[int, ...] = (16384, 9216, 16384, 9216, 16384)


def write_matmul_chain(folder: str | os.PathLike[str], dims: Sequence[int] = LARGE_DIMS, *, samples: int = 8,
                       seed: int = 0, relu: bool = True) -> Path:
    """Write the model, its data and a pipeline.yaml into `folder`; return the pipeline.yaml's path."""
    from onnx import TensorProto, helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data_name = "model.onnx.data"
    inits, nodes = [], []
    x = "x"
    offset = 0
    with open(folder / data_name, "wb") as f:
        for i, (k, n) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            w = rng.standard_normal((k, n), dtype=np.float32)
            w *= np.float32(1.0 / np.sqrt(k))  # keeps activations near unit scale down the chain
            f.write(w.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[k, n])
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                t.external_data.add(key=key, value=value)
            t.data_location = TensorProto.EXTERNAL
            offset += w.nbytes
            del w
            inits.append(t)
            out = f"h{i}" if i < len(dims) - 2 else "y"
            mm = out if not relu or i == len(dims) - 2 else f"m{i}"
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [mm], name=f"matmul{i}"))
            if mm != out:
                nodes.append(helper.make_node("Relu", [mm], [out], name=f"relu{i}"))
            x = out
    graph = helper.make_graph(nodes, "matmul_chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dims[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dims[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="quantpipe-tests")
    model.ir_version = 8
    with open(folder / "model.onnx", "wb") as f:
        f.write(model.SerializeToString())
    np.savez(folder / "calib.npz", x=rng.standard_normal((samples, dims[0]), dtype=np.float32))
    ev = rng.standard_normal((samples, dims[0]), dtype=np.float32)
    np.savez(folder / "eval.npz", x=ev)
    (folder / "pipeline.yaml").write_text(_PIPELINE.format(batch=max(1, samples // 2)))
    return folder / "pipeline.yaml"


_PIPELINE = """\
version: 1
name: big
model:
  path: model.onnx
  output: y
data:
  calibration: {{path: calib.npz}}
  evaluation: {{path: eval.npz}}
  batch_size: {batch}
calibration:
  methods: [entropy, minmax]
  use: best
  device: cpu
build:
  backends:
    onnxruntime: {{precisions: [fp32, fp16, int8], device: cpu}}
    tensorrt: {{enabled: false}}
  quantize:
    split_activations: "off"
evaluate:
  metrics: [cosine, sqnr_db, max_abs_error]
  latency: {{warmup: 1, iterations: 2, batch_sizes: [1]}}
  sensitivity: {{enabled: true, max_samples: 4}}
gate:
  rules:
    - {{variant: ort-int8, metric: cosine, min: 0.9}}
report:
  dir: reports
"""
