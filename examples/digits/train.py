"""Train the bundled "digits" example CNN and export it to ONNX.

This script (re)creates the real example that quantpipe is demonstrated and
tested on.  You only need to run it if you want to regenerate the committed
artifacts; the outputs are already in the repository:

    examples/digits/digits_cnn.onnx          FP32 ONNX model (opset 17)
    calib_data/digits/calib.npz              calibration inputs   [200,1,32,32]
    calib_data/digits/eval.npz               evaluation inputs    [400,1,32,32] + labels
    calib_data/digits/samples/sample_NNN.npz 24 per-sample files from the eval split
    calib_data/digits/README.md              provenance / preprocessing / accuracy

torch is only needed to re-train (quantpipe itself and its tests use the committed
files and do not need torch).  Re-training needs PyTorch and scikit-learn,
CPU only is fine:

    pip install torch==2.13.0 scikit-learn
    # plus onnx, onnxruntime, numpy (already quantpipe dependencies)
    python examples/digits/train.py

Data: scikit-learn's bundled ``load_digits()`` (1797 8x8 grey images with
values 0..16; a copy of the UCI "Optical Recognition of Handwritten Digits"
test set, shipped inside the scikit-learn wheel, so nothing is downloaded).

Preprocessing (identical for train / calib / eval, and what a user of the
ONNX model must apply):

    x = image / 16.0                               # 0..16 -> 0..1
    x = bilinear upsample 8x8 -> 32x32             # F.interpolate(align_corners=False)
    x = (x - 0.3053) / 0.3239                      # NORM_MEAN / NORM_STD

NORM_MEAN / NORM_STD are fixed constants, equal (to 4 decimals) to the mean
and std of the upsampled training split; the script re-computes them and
asserts they still match.

Splits (disjoint, stratified by label, deterministic):
    eval  = 400  train_test_split(all,  test_size=400, stratify=y, random_state=0)
    calib = 200  train_test_split(rest, test_size=200, stratify=y, random_state=0)
    train = 1197 (the remainder)

Everything is seeded and run with ``torch.use_deterministic_algorithms(True)``
and one CPU thread (the default ``--threads 1``), so repeated runs give
byte-identical output files. Other thread counts change the floating-point
reduction order and therefore the weights (accuracy stays ~98.5-99%).
Runtime: about 1-2 minutes on 2 CPU cores (single-threaded training).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import sys
import time
from pathlib import Path

import numpy as np

SEED = 0
NORM_MEAN = 0.3053
NORM_STD = 0.3239
IMG_SIZE = 32
N_EVAL = 400
N_CALIB = 200
N_SAMPLES = 24
EPOCHS = 25
BATCH_SIZE = 64
LR = 2e-3
MAX_SHIFT = 2  # random-translation augmentation, in pixels of the 32x32 image
OPSET = 17

REPO_ROOT = Path(__file__).resolve().parents[2]
ONNX_PATH = REPO_ROOT / "examples" / "digits" / "digits_cnn.onnx"
DATA_DIR = REPO_ROOT / "calib_data" / "digits"


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def load_splits():
    """Return (X_all float32 [N,8,8] in 0..16, y_all int64 [N], train, calib, eval idx)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    rest_idx, eval_idx = train_test_split(idx, test_size=N_EVAL, stratify=labels, random_state=SEED)
    train_idx, calib_idx = train_test_split(rest_idx, test_size=N_CALIB, stratify=labels[rest_idx], random_state=SEED)
    # keep each split in ascending dataset order (stable, easy to trace back)
    train_idx, calib_idx, eval_idx = (np.sort(a) for a in (train_idx, calib_idx, eval_idx))
    assert not (set(train_idx) & set(calib_idx))
    assert not (set(train_idx) & set(eval_idx))
    assert not (set(calib_idx) & set(eval_idx))
    assert len(train_idx) + len(calib_idx) + len(eval_idx) == len(labels)
    return images, labels, train_idx, calib_idx, eval_idx


def upsample01(images_0_16: np.ndarray):
    """[N,8,8] 0..16 -> torch float32 [N,1,32,32] in 0..1 (bilinear, align_corners=False)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(images_0_16, dtype=np.float32))[:, None] / 16.0
    return F.interpolate(t, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False)


def preprocess(images_0_16: np.ndarray) -> np.ndarray:
    """Full preprocessing used by the model: -> float32 [N,1,32,32], ~zero mean / unit std."""
    x = upsample01(images_0_16)
    x = (x - NORM_MEAN) / NORM_STD
    return x.numpy().astype(np.float32)


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------
def build_model():
    import torch.nn as nn

    def conv_bn(cin, cout, relu=True):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    class ResidualBlock(nn.Module):
        """conv-bn-relu -> conv-bn, + identity, relu (exercises Q/DQ around Add)."""

        def __init__(self, ch):
            super().__init__()
            self.conv1 = conv_bn(ch, ch)
            self.conv2 = conv_bn(ch, ch, relu=False)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv2(self.conv1(x)) + x)

    class DigitsCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                conv_bn(1, 16),  # 16x32x32
                conv_bn(16, 16),  # 16x32x32
                ResidualBlock(16),  # 16x32x32  (Add)
                nn.MaxPool2d(2),  # 16x16x16
                conv_bn(16, 32),  # 32x16x16
                nn.MaxPool2d(2),  # 32x8x8
                conv_bn(32, 64),  # 64x8x8
                nn.AdaptiveAvgPool2d(1),  # 64x1x1 (GlobalAveragePool)
                nn.Flatten(),  # 64
            )
            self.classifier = nn.Sequential(
                nn.Linear(64, 64),
                nn.ReLU(),
                nn.Linear(64, 10),
            )

        def forward(self, x):
            return self.classifier(self.features(x))

    return DigitsCNN()


def random_shift(x, gen, max_shift: int, fill: float):
    """Translate each image by an integer (dy, dx) in [-max_shift, max_shift], filling with `fill`."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


def predict_torch(model, x: np.ndarray, batch: int = 200) -> np.ndarray:
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i : i + batch])).numpy())
    return np.concatenate(out)


def train(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray):
    import torch
    import torch.nn.functional as F

    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    steps_per_epoch = (len(x_train) + BATCH_SIZE - 1) // BATCH_SIZE
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, epochs=EPOCHS, steps_per_epoch=steps_per_epoch)
    gen = torch.Generator().manual_seed(SEED)
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    bg = (0.0 - NORM_MEAN) / NORM_STD  # background value after normalisation

    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total_loss, correct = 0.0, 0
        for i in range(0, len(xt), BATCH_SIZE):
            bi = perm[i : i + BATCH_SIZE]
            xb = random_shift(xt[bi], gen, MAX_SHIFT, bg)
            yb = yt[bi]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(bi)
            correct += int((logits.argmax(1) == yb).sum())
        eval_acc = float((predict_torch(model, x_eval).argmax(1) == y_eval).mean())
        print(
            f"epoch {epoch + 1:2d}/{EPOCHS}  loss {total_loss / len(xt):.4f}  "
            f"train_acc {correct / len(xt):.4f}  eval_acc {eval_acc:.4f}",
            flush=True,
        )
    model.eval()
    return model


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------
def export_onnx(model, path: Path):
    import warnings

    import onnx
    import torch

    buf = io.BytesIO()
    dummy = torch.zeros(1, 1, IMG_SIZE, IMG_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy-exporter notice
        torch.onnx.export(
            model,
            (dummy,),
            buf,
            dynamo=False,  # legacy TorchScript exporter: no onnxscript dependency
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,  # folds BatchNorm into Conv in eval mode
            training=torch.onnx.TrainingMode.EVAL,
        )
    m = onnx.load_from_string(buf.getvalue())

    # strip debug / non-deterministic metadata
    m.doc_string = ""
    m.graph.doc_string = ""
    del m.metadata_props[:]
    for node in m.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    for coll in (m.graph.input, m.graph.output, m.graph.value_info, m.graph.initializer):
        for item in coll:
            item.doc_string = ""
    m.producer_name = "quantpipe-examples-digits"
    m.producer_version = "1"
    m.graph.name = "digits_cnn"

    onnx.checker.check_model(m, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = m.SerializeToString(deterministic=True)
    path.write_bytes(data)
    return m


def predict_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


# --------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------
def savez(path: Path, **arrays):
    """np.savez_compressed with fixed zip timestamps -> byte-identical files across runs."""
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            b = io.BytesIO()
            np.lib.format.write_array(b, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, b.getvalue())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_readme(stats: dict):
    text = f"""# digits — calibration / evaluation data for `examples/digits/digits_cnn.onnx`

Generated by `examples/digits/train.py` (do not edit by hand; re-run the script).

## Provenance

* Source: scikit-learn `sklearn.datasets.load_digits()` — 1797 greyscale 8x8
  images of handwritten digits 0-9, pixel values 0..16. It is a copy of the test
  set of the UCI ML "Optical Recognition of Handwritten Digits" data set
  (E. Alpaydin, C. Kaynak, 1998; https://archive.ics.uci.edu/dataset/80),
  shipped inside the scikit-learn wheel (no download).
* Licence: distributed with scikit-learn under the BSD-3-Clause licence; the
  UCI original is licensed CC BY 4.0.

## Preprocessing (applied to every array here; the ONNX model expects it)

```
x = image / 16.0  # [N,8,8], 0..16 -> 0..1
x = F.interpolate(x[:, None], size=(32, 32), mode="bilinear", align_corners=False)
x = (x - {NORM_MEAN}) / {NORM_STD}  # NORM_MEAN / NORM_STD
```

`{NORM_MEAN}` / `{NORM_STD}` are fixed constants equal to the mean / std of the
upsampled training split (measured: {stats["train_mean"]:.4f} / {stats["train_std"]:.4f}). The background (pixel 0) maps to
{(0 - NORM_MEAN) / NORM_STD:.4f}, full ink (16) to {(1 - NORM_MEAN) / NORM_STD:.4f}. Tensors are float32, NCHW `[N,1,32,32]`.

## Splits (disjoint, stratified by label, seed 0)

| split | size | how | file |
|---|---|---|---|
| eval  | {stats["n_eval"]} | `train_test_split(all, test_size=400, stratify=y, random_state=0)` | `eval.npz` (`input` float32 [{stats["n_eval"]},1,32,32], `label` int64 [{stats["n_eval"]}]) |
| calib | {stats["n_calib"]} | `train_test_split(rest, test_size=200, stratify=y_rest, random_state=0)` | `calib.npz` (`input` float32 [{stats["n_calib"]},1,32,32], no labels) |
| train | {stats["n_train"]} | the remainder (not saved) | — |

Indices within each split are in ascending `load_digits()` order.
`samples/sample_000.npz` … `sample_{N_SAMPLES - 1:03d}.npz` are the first {N_SAMPLES} eval
samples, one file each (`input` float32 [1,1,32,32], `label` int64 [1]) — an example
of the "folder of per-sample .npz" data source.

## Accuracy of the FP32 model on `eval.npz`

| runtime | top-1 |
|---|---|
| PyTorch (FP32) | {stats["torch_acc"] * 100:.2f}% ({stats["torch_correct"]}/{stats["n_eval"]}) |
| onnxruntime CPU (`digits_cnn.onnx`) | {stats["onnx_acc"] * 100:.2f}% ({stats["onnx_correct"]}/{stats["n_eval"]}) |

Max |logit difference| torch vs onnxruntime on eval: {stats["max_abs_diff"]:.2e}.

## SHA-256

```
{stats["sha_onnx"]}  examples/digits/digits_cnn.onnx
{stats["sha_calib"]}  calib_data/digits/calib.npz
{stats["sha_eval"]}  calib_data/digits/eval.npz
```
"""
    (DATA_DIR / "README.md").write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)

    t0 = time.perf_counter()
    images, labels, tr, ca, ev = load_splits()

    up_train = upsample01(images[tr])
    train_mean, train_std = float(up_train.mean()), float(up_train.std())
    print(f"train split stats after /16 + upsample: mean {train_mean:.4f} std {train_std:.4f}")
    assert abs(train_mean - NORM_MEAN) < 1e-4 and abs(train_std - NORM_STD) < 1e-4, (
        "normalisation constants no longer match the training split"
    )

    x_train, x_calib, x_eval = preprocess(images[tr]), preprocess(images[ca]), preprocess(images[ev])
    y_train, y_eval = labels[tr], labels[ev]
    print(f"splits: train {len(tr)}  calib {len(ca)}  eval {len(ev)}")

    model = train(x_train, y_train, x_eval, y_eval)
    t_train = time.perf_counter() - t0

    torch_logits = predict_torch(model, x_eval)
    torch_pred = torch_logits.argmax(1)
    torch_correct = int((torch_pred == y_eval).sum())

    export_onnx(model, ONNX_PATH)
    onnx_logits = predict_onnx(ONNX_PATH, x_eval)
    onnx_pred = onnx_logits.argmax(1)
    onnx_correct = int((onnx_pred == y_eval).sum())
    max_abs_diff = float(np.abs(onnx_logits - torch_logits).max())

    print(f"torch eval accuracy : {torch_correct / len(ev):.4f} ({torch_correct}/{len(ev)})")
    print(f"onnx  eval accuracy : {onnx_correct / len(ev):.4f} ({onnx_correct}/{len(ev)})")
    print(f"max |torch - onnx| logits: {max_abs_diff:.3e}")
    if onnx_correct != torch_correct or not np.array_equal(onnx_pred, torch_pred):
        print("ERROR: onnxruntime predictions differ from torch", file=sys.stderr)
        return 1
    if onnx_correct / len(ev) < 0.97:
        print("ERROR: eval accuracy below 97%", file=sys.stderr)
        return 1

    savez(DATA_DIR / "calib.npz", input=x_calib)
    savez(DATA_DIR / "eval.npz", input=x_eval, label=y_eval.astype(np.int64))
    sample_dir = DATA_DIR / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    for old in sample_dir.glob("sample_*.npz"):
        old.unlink()
    for i in range(N_SAMPLES):
        savez(
            sample_dir / f"sample_{i:03d}.npz",
            input=x_eval[i : i + 1],
            label=y_eval[i : i + 1].astype(np.int64),
        )

    stats = dict(
        train_mean=train_mean,
        train_std=train_std,
        n_train=len(tr),
        n_calib=len(ca),
        n_eval=len(ev),
        torch_acc=torch_correct / len(ev),
        torch_correct=torch_correct,
        onnx_acc=onnx_correct / len(ev),
        onnx_correct=onnx_correct,
        max_abs_diff=max_abs_diff,
        sha_onnx=sha256(ONNX_PATH),
        sha_calib=sha256(DATA_DIR / "calib.npz"),
        sha_eval=sha256(DATA_DIR / "eval.npz"),
    )
    write_readme(stats)
    print(f"wrote {ONNX_PATH.relative_to(REPO_ROOT)} sha256 {stats['sha_onnx']}")
    print(f"wrote {DATA_DIR.relative_to(REPO_ROOT)}/ (calib.npz, eval.npz, samples/, README.md)")
    print(f"train time {t_train:.1f}s, total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
