"""Property tests of the data loader: any .npz file or folder is a valid Dataset or a DataError (exit 2).

Generated files hold the model's inputs with random shapes, dtypes and values (NaN included), extra arrays, labels
of any dtype and shape, and are sometimes truncated or damaged. A Dataset that opens must iterate in full, with
one integer label >= 0 per sample. `derandomize=True`: the same cases on every run.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from quantpipe.artifacts import TensorInfo
from quantpipe.data import Dataset, open_dataset
from quantpipe.errors import EXIT_BAD_INPUT, QuantpipeError
from tests.properties import examples

MODELS = {
    "image": (TensorInfo("input", "float32", ("batch", 1, 4, 4)),),
    "text": (TensorInfo("ids", "int64", ("batch", "seq")), TensorInfo("mask", "int64", ("batch", "seq"))),
    "static": (TensorInfo("x", "float32", (2, 3)),),
}
DTYPES = ["float32", "float64", "float16", "int64", "int32", "uint8", "bool", "complex64", "<U2", "datetime64[s]"]
VALUES = st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0, 7.0, 57.0, np.nan, np.inf, -np.inf, 1e30])


@st.composite
def array(draw: st.DrawFn, shape: tuple[int, ...]) -> np.ndarray:
    dtype = draw(st.sampled_from(DTYPES))
    fill = draw(VALUES)
    with np.errstate(all="ignore"):
        if dtype == "<U2":
            return np.full(shape, "ab")
        if dtype.startswith("datetime"):
            return np.zeros(shape, dtype)
        arr = np.full(shape, fill, dtype=np.float64)
        if arr.size and draw(st.booleans()):
            arr.reshape(-1)[draw(st.integers(0, arr.size - 1))] = draw(VALUES)
        return arr.astype(dtype)


@st.composite
def shape_near(draw: st.DrawFn, info: TensorInfo, rows: int, per_sample: bool) -> tuple[int, ...]:
    want = [rows if i == 0 else (d if isinstance(d, int) else draw(st.integers(1, 3))) for i, d in enumerate(info.shape)]
    if per_sample and draw(st.booleans()):
        want = want[1:]  # a per-sample file may drop the batch axis
    edit = draw(st.sampled_from(["as is", "as is", "as is", "rank", "dim", "scalar"]))
    if edit == "rank":
        want = want[:-1] if draw(st.booleans()) else [*want, 1]
    elif edit == "dim" and want:
        want[draw(st.integers(0, len(want) - 1))] = draw(st.integers(0, 5))
    elif edit == "scalar":
        want = []
    return tuple(want)


@st.composite
def arrays(draw: st.DrawFn, inputs: tuple[TensorInfo, ...], per_sample: bool) -> dict[str, np.ndarray]:
    rows = 1 if per_sample else draw(st.integers(0, 6))
    out: dict[str, np.ndarray] = {}
    for info in inputs:
        if draw(st.integers(0, 9)) == 0:
            continue  # the input is missing
        out[info.name] = draw(array(draw(shape_near(info, rows + draw(st.sampled_from([0, 0, 0, 1])), per_sample))))
    if draw(st.booleans()):
        label_shape = draw(st.sampled_from([(rows,), (rows,), (rows, 1), (rows, 3), (), (rows + 1,), (0,)]))
        out["label"] = draw(array(label_shape))
    if draw(st.integers(0, 4)) == 0:
        out[draw(st.sampled_from(["extra", "input_", "label2"]))] = draw(array((rows,)))
    return out


def _npz_bytes(draw: st.DrawFn, contents: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if draw(st.booleans()) else np.savez)(buf, **contents)
    data = buf.getvalue()
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "flip"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
    return data


def _use(opened: Any, labels_key: str | None, batch_size: int) -> None:
    """Open, and iterate a Dataset in full: counts agree, labels are integer class indices."""
    try:
        ds = opened()
    except QuantpipeError as err:
        assert err.exit_code == EXIT_BAD_INPUT, err
        assert str(err).strip()
        return
    assert isinstance(ds, Dataset) and ds.num_samples >= 1
    try:
        batches = list(ds.batches(batch_size))
    except QuantpipeError as err:  # a per-sample file read again at batch time
        assert err.exit_code == EXIT_BAD_INPUT, err
        return
    assert sum(b.size for b in batches) == ds.num_samples
    for b in batches:
        for info in ds.inputs:
            assert b.feeds[info.name].dtype == np.dtype(info.dtype)
    if labels_key is None:
        assert ds.labels is None
        return
    assert ds.labels is not None and ds.labels.shape == (ds.num_samples,)
    assert ds.labels.dtype.kind in "iu" and bool(np.all(ds.labels >= 0))
    try:
        ds.check_label_range(3, "logits")
    except QuantpipeError as err:
        assert err.exit_code == EXIT_BAD_INPUT and "[0, 3)" in str(err)
    else:
        assert bool(np.all(ds.labels < 3))


@examples(2000)
@given(data=st.data(), model=st.sampled_from(sorted(MODELS)), labels=st.booleans(),
       max_samples=st.none() | st.integers(1, 4), batch_size=st.integers(1, 4))
def test_any_npz_opens_or_is_a_data_error(data: st.DataObject, model: str, labels: bool, max_samples: int | None,
                                          batch_size: int, tmp_path: Path) -> None:
    inputs = MODELS[model]
    path = tmp_path / "d.npz"
    path.write_bytes(_npz_bytes(data.draw, data.draw(arrays(inputs, per_sample=False))))
    key = "label" if labels else None
    _use(lambda: open_dataset(path, inputs, labels_key=key, max_samples=max_samples, role="evaluation"), key, batch_size)


@examples(800)
@given(data=st.data(), model=st.sampled_from(sorted(MODELS)), files=st.integers(0, 3), labels=st.booleans(),
       batch_size=st.integers(1, 4))
def test_any_folder_opens_or_is_a_data_error(data: st.DataObject, model: str, files: int, labels: bool,
                                             batch_size: int, tmp_path: Path) -> None:
    inputs = MODELS[model]
    folder = tmp_path / "samples"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for i in range(files):
        (folder / f"{i:03d}.npz").write_bytes(_npz_bytes(data.draw, data.draw(arrays(inputs, per_sample=True))))
    key = "label" if labels else None
    _use(lambda: open_dataset(folder, inputs, labels_key=key, role="evaluation"), key, batch_size)
