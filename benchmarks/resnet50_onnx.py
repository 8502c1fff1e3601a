"""A ResNet-50-shaped FP32 ONNX model with random weights, and smooth-noise images for it, without torch.

    python benchmarks/resnet50_onnx.py OUT_DIR [--images 512] [--size 224]

writes OUT_DIR/model.onnx (the torchvision ResNet-50 layout with BatchNorm folded into the convolutions: a 7x7
stem, max-pool, Bottleneck blocks [3, 4, 6, 3] of widths 64..512 (x4 out), global average pool, a 1000-way Gemm;
25.5 M parameters, opset 17, dynamic batch) and OUT_DIR/calib.npz / eval.npz (3 x size x size images:
bilinearly upsampled Gaussian noise, fixed seeds, stored uncompressed so they are read batch by batch).

The weights are random (He initialisation, the last convolution of each block scaled by 0.2 so the residual
sum stays bounded over 16 blocks): the model's numbers mean nothing, its shape and cost are ResNet-50's.
It serves the scaling benchmark (benchmarks/scaling.py) where torchvision is not installed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

INPUT = "input"
OUTPUT = "logits"
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
"""(width, blocks, stride of the first block) of ResNet-50's four stages; each block outputs 4 x width."""


class _Graph:
    """Collects nodes and initializers with unique names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.count = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}_{self.count}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, gain: float = 1.0) -> str:
        from onnx import helper, numpy_helper

        n = self.name("conv")
        w = (self.rng.standard_normal((cout, cin, k, k)) * gain * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.01).astype(np.float32)
        self.inits += [numpy_helper.from_array(w, f"{n}.w"), numpy_helper.from_array(b, f"{n}.b")]
        self.nodes.append(helper.make_node("Conv", [x, f"{n}.w", f"{n}.b"], [n], name=n, kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[k // 2] * 4))
        return n

    def op(self, op: str, inputs: list[str], **attrs: object) -> str:
        from onnx import helper

        n = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [n], name=n, **attrs))
        return n

    def bottleneck(self, x: str, cin: int, width: int, stride: int) -> str:
        y = self.op("Relu", [self.conv(x, cin, width, 1)])
        y = self.op("Relu", [self.conv(y, width, width, 3, stride)])
        y = self.conv(y, width, 4 * width, 1, gain=0.2)
        skip = x if stride == 1 and cin == 4 * width else self.conv(x, cin, 4 * width, 1, stride)
        return self.op("Relu", [self.op("Add", [y, skip])])


def build_model(path: Path, *, seed: int = 0) -> Path:
    """Write the ResNet-50-shaped model to `path`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = _Graph(seed)
    x = g.op("Relu", [g.conv(INPUT, 3, 64, 7, 2)])
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for width, blocks, stride in STAGES:
        for i in range(blocks):
            x = g.bottleneck(x, cin, width, stride if i == 0 else 1)
            cin = 4 * width
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    w = (g.rng.standard_normal((1000, cin)) / np.sqrt(cin)).astype(np.float32)
    g.inits += [numpy_helper.from_array(w, "fc.w"), numpy_helper.from_array(np.zeros(1000, np.float32), "fc.b")]
    g.nodes.append(helper.make_node("Gemm", [x, "fc.w", "fc.b"], [OUTPUT], name="fc", transB=1))
    graph = helper.make_graph(g.nodes, "resnet50_shaped",
                              [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", 1000])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_images(path: Path, count: int, *, size: int = 224, seed: int = 0) -> Path:
    """`count` smooth-noise images [count, 3, size, size] (float32) in an uncompressed .npz, written in chunks."""
    rng = np.random.default_rng(seed)
    low = max(1, size // 4)
    out = np.empty((count, 3, size, size), dtype=np.float32)
    idx = (np.arange(size) + 0.5) * low / size - 0.5
    i0 = np.clip(np.floor(idx).astype(int), 0, low - 1)
    i1 = np.clip(i0 + 1, 0, low - 1)
    f = (idx - np.floor(idx)).astype(np.float32)
    for start in range(0, count, 64):
        stop = min(start + 64, count)
        noise = rng.standard_normal((stop - start, 3, low, low)).astype(np.float32)
        rows = noise[:, :, i0, :] * (1 - f)[None, None, :, None] + noise[:, :, i1, :] * f[None, None, :, None]
        out[start:stop] = rows[:, :, :, i0] * (1 - f) + rows[:, :, :, i1] * f
    np.savez(path, **{INPUT: out})
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--images", type=int, default=512, help="calibration images (evaluation gets half as many)")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    build_model(args.out / "model.onnx")
    build_images(args.out / "calib.npz", args.images, size=args.size, seed=1)
    build_images(args.out / "eval.npz", max(1, args.images // 2), size=args.size, seed=2)
    print(f"wrote {args.out}/model.onnx, calib.npz ({args.images} images), eval.npz")


if __name__ == "__main__":
    main()
