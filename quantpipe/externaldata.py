"""External data: ONNX tensors stored in files beside the model (every model over protobuf's 2 GB limit).

`onnxgraph.load_onnx(path)` keeps them there and records in each reference the folder it is relative to
(the `basepath` key, which onnx allows and `onnx.save_model` strips), so a model proto copied and rewritten
anywhere still knows where its weights are: `tensor_value` reads one, `write_external` streams them into a
new file one at a time, `strip_basepath` makes a copy that onnxruntime accepts (it takes the folder as a
session option instead).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.errors import ModelError

__all__ = [
    "BASEPATH", "check_external_data", "drop_entry", "entry", "external_bytes", "external_data_files",
    "external_folders", "external_tensors", "has_external_data", "in_memory_bytes", "set_entry", "strip_basepath",
    "tensor_value", "write_external",
]

#: The external-data key `load_onnx(external_data=False)` records a reference's folder in (onnx allows it;
#: `onnx.save_model` strips it; onnxruntime refuses it, so `strip_basepath` removes it for sessions).
BASEPATH = "basepath"


def external_tensors(model: Any) -> list[Any]:
    """Every TensorProto of `model` (initializers and Constant values, subgraphs included) stored externally."""
    from onnx import TensorProto

    return [t for t in _all_tensors(model) if t.data_location == TensorProto.EXTERNAL]


def has_external_data(model: Any) -> bool:
    """Whether any tensor of `model` is stored in an external file (not loaded into the proto)."""
    return bool(external_tensors(model))


def external_data_files(model: Any, model_path: str | os.PathLike[str]) -> list[Path]:
    """The external-data files `model` (read from `model_path`) names, sorted, each once."""
    folder = Path(model_path).parent
    return sorted({folder / _location(t) for t in external_tensors(model)})


def check_external_data(model: Any, path: Path) -> None:
    """ModelError when an external-data file the model names is missing, outside its folder, or too short."""
    needed: dict[str, int] = {}
    for t in external_tensors(model):
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or Path(loc).is_absolute() or ".." in Path(loc).parts:
            raise ModelError(f"model {path}: tensor '{t.name}' names external data at '{loc}', which is not a path "
                             f"inside the model's folder. Save the model again with onnx.save_model(..., "
                             f"save_as_external_data=True) so its data file sits beside it.")
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        needed[loc] = max(needed.get(loc, 0), end)
    for loc, end in sorted(needed.items()):
        f = path.parent / loc
        if not f.is_file():
            raise ModelError(f"model {path} keeps its weights in the external data file '{loc}', which is missing "
                             f"(looked for {f}). Copy it beside the model (ONNX resolves it relative to the model's "
                             f"folder), or export the model again.")
        if f.stat().st_size < end:
            raise ModelError(f"model {path}: its external data file {f} has {f.stat().st_size} bytes but the model "
                             f"reads up to byte {end}; the file is truncated or belongs to another export. Copy "
                             f"it again or export the model again.")


def tensor_value(tensor: Any, base_dir: str | os.PathLike[str] | None = None) -> np.ndarray:
    """A TensorProto's value; an external one is read from `base_dir`, by default the folder `load_onnx`
    recorded in it."""
    from onnx import numpy_helper

    if base_dir is None:
        base_dir = entry(tensor, BASEPATH)
    return numpy_helper.to_array(tensor, base_dir=os.fspath(base_dir))


def entry(tensor: Any, key: str) -> str:
    """The value of one `external_data` entry of a TensorProto ("" when absent)."""
    return next((e.value for e in tensor.external_data if e.key == key), "")


def set_entry(tensor: Any, key: str, value: str) -> None:
    for e in tensor.external_data:
        if e.key == key:
            e.value = value
            return
    tensor.external_data.add(key=key, value=value)


def drop_entry(tensor: Any, key: str) -> None:
    keep = [(e.key, e.value) for e in tensor.external_data if e.key != key]
    del tensor.external_data[:]
    for k, v in keep:
        tensor.external_data.add(key=k, value=v)


def external_folders(model: Any) -> set[str]:
    """The folders (absolute) that `model`'s external references are relative to, as `load_onnx` recorded them."""
    return {entry(t, BASEPATH) for t in external_tensors(model)}


def strip_basepath(model: Any) -> Any:
    """`model` (a copy when it has external references) without the folder `load_onnx` records in them:
    onnxruntime refuses unknown external-data keys; its folder goes in its session options instead."""
    import onnx

    if not has_external_data(model):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in external_tensors(m):
        drop_entry(t, BASEPATH)
    return m


def in_memory_bytes(model: Any) -> int:
    """The bytes of the tensors held inside the proto (not external ones): what decides whether it can be
    serialised as one protobuf (ModelProto.ByteSize itself fails past 2 GiB)."""
    from onnx import TensorProto

    return sum(t.ByteSize() for t in _all_tensors(model) if t.data_location != TensorProto.EXTERNAL)


def external_bytes(model: Any) -> int:
    """The bytes of `model`'s tensors stored in external files."""
    return sum(int(entry(t, "length") or 0) for t in external_tensors(model))


def write_external(model: Any, path: str | os.PathLike[str], *, threshold: int = 1024) -> None:
    """Write `model` to `path` with every tensor of >= `threshold` bytes in one external file `<name>.data`
    beside it, streamed one tensor at a time: tensors the proto holds and tensors it still references in other
    files (`load_onnx(external_data=False)`) alike, so no copy of the whole model is ever in memory. `model`
    is changed: its tensors end up referencing the new file (pass a copy, or drop it after)."""
    from onnx import TensorProto

    path = Path(path)
    data_name = path.name + ".data"
    with open(path.parent / data_name, "wb") as out:
        for t in _all_tensors(model):
            if t.data_location == TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                with open(Path(info.get(BASEPATH, ".")) / info["location"], "rb") as src:
                    src.seek(int(info.get("offset", 0) or 0))
                    raw = src.read(int(info["length"])) if "length" in info else src.read()
            elif t.HasField("raw_data") and len(t.raw_data) >= threshold:
                raw = t.raw_data
            else:
                continue
            offset = out.tell()
            out.write(raw)
            del raw
            t.ClearField("raw_data")
            del t.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(out.tell() - offset))):
                t.external_data.add(key=key, value=value)
            t.data_location = TensorProto.EXTERNAL
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def _location(tensor: Any) -> str:
    return entry(tensor, "location")


def _all_tensors(model: Any) -> list[Any]:
    from onnx import AttributeProto

    out: list[Any] = []

    def visit(g: Any) -> None:
        out.extend(g.initializer)
        for node in g.node:
            for a in node.attribute:
                if a.type == AttributeProto.TENSOR:
                    out.append(a.t)
                elif a.type == AttributeProto.TENSORS:
                    out.extend(a.tensors)
                elif a.type == AttributeProto.GRAPH:
                    visit(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        visit(sub)

    visit(model.graph)
    return out
