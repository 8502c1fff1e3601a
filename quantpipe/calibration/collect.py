"""Run the FP32 model through ONNX Runtime and stream every tensor that needs a scale into a histogram.

Tensors (named as in the ORIGINAL graph, which is what Q/DQ placement and TensorRT's cache refer to):
graph inputs of a float type (kind "input"), every float node output (kind "activation"; exposed as extra
graph outputs of an in-memory copy of the model, so ONNX Runtime's optimisers keep them), and weights
held in initializers or Constant nodes (kind "weight"; histogrammed from their values, no inference).
Types come from ONNX shape inference; outputs of unknown type are exposed and checked at run time.

Cost and memory (the issue's 2-core budget):
- a Relu's output is not exposed nor binned: its input gets a SignedHistogram, whose positive side is
  exactly the Relu's histogram (in a ResNet that is 40% of the activation values);
- nor is the output of a Reshape, Transpose, Flatten, Squeeze, Unsqueeze or Identity of a binned tensor: it
  holds the same values, so its histogram is a copy of its input's (in MiniLM, 15% of the activation values);
  the runs are sized as if they were fetched, so the histograms are those of a pass that bins them;
- the histograms of one run are binned on a small thread pool between ONNX Runtime runs (numpy releases
  the GIL in its kernels); ONNX Runtime's threads do not spin, so they leave the cores to it;
- on the CPU, batches are split into runs whose activations stay under `max_run_bytes` (192 MiB): the
  histograms do not depend on the batching, so memory is bounded whatever the batch size. Only one run's
  activations are alive at a time; histograms are O(bins) per tensor.

Models with external data (and > 2 GB models) work: the copy is serialised without its weights, and ONNX
Runtime reads them from the original model's folder. On the CUDA execution provider the outputs stay on
the device (IOBinding) and are histogrammed there with CuPy when it is importable, else copied to the
host; the exact integer binning (histogram.py) makes the histograms independent of the device.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from quantpipe.calibration.binning import Binner
from quantpipe.calibration.device import DeviceOutputs
from quantpipe.calibration.histogram import DEFAULT_NUM_BINS, SignedHistogram, StreamingHistogram
from quantpipe.calibration.plan import TensorPlan, constant_value, is_constant, plan_tensors
from quantpipe.data import Dataset
from quantpipe.errors import CalibrationError, DataError, ModelError

__all__ = ["CollectedStats", "PartialStats", "Timing", "TensorPlan", "collect_histograms", "collect_partial", "finish_stats",
           "plan_tensors", "session_options", "same_value_sources", "SAME_VALUE_OPS", "KINDS", "CUDA_CALIBRATION_OPTIONS", "DEFAULT_MAX_RUN_BYTES"]

log = logging.getLogger(__name__)

KINDS = ("input", "activation", "weight")

OnBatch = Callable[[int, int], None]

_CPU_EP = "CPUExecutionProvider"
_CUDA_EP = "CUDAExecutionProvider"
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
DEFAULT_MAX_RUN_BYTES = 192 << 20
"""Activations of one ONNX Runtime run, at most (CPU); batches are split to stay under it. EfficientNet-Lite0's pass
peaked at 507 MiB RSS with onnxruntime's CPU arena, 463 MiB without, 356 MiB without and at 64 MiB per run; but a
tensor that does not depend on the batch (MiniLM's position embedding) is binned once per run, so its histogram
counts (not its amax) follow the number of runs: lowering this changes histograms.npz."""
#: Calibration on the GPU runs in true FP32: onnxruntime's CUDA provider uses TF32 by default on Ampere and
#: newer, which moved activations by ~1e-3 relative (up to 1.8 histogram bins on EfficientNet-Lite0, H200).
#: And each (convolution, input shape) runs only a few batches in a fresh session, so cuDNN's exhaustive
#: algorithm search (the default) costs more than it saves: on an H200, EfficientNet-Lite0 over 63 images took
#: 1.91 s exhaustive, 1.43 s heuristic, 1.06 s "DEFAULT" -- but DEFAULT makes onnxruntime print a "Fallback
#: mode" warning for most convolutions and shapes, so the heuristic it is.
CUDA_CALIBRATION_OPTIONS: Mapping[str, str] = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
"""onnxruntime CUDA provider options calibration uses unless `collect_histograms(cuda_options=...)` says otherwise."""


@dataclasses.dataclass(frozen=True)
class CollectedStats:
    """Per-tensor histograms from one pass over the calibration data."""

    histograms: Mapping[str, StreamingHistogram]
    kinds: Mapping[str, str]
    """tensor -> 'input' | 'activation' | 'weight'."""
    num_samples: int
    num_batches: int
    """ONNX Runtime runs (batches, some split to bound memory)."""
    seconds: float
    inference_seconds: float = 0.0
    """Wall time inside ONNX Runtime."""
    histogram_seconds: float = 0.0
    """Wall time spent binning activations (weights included)."""
    plan_seconds: float = 0.0
    """Wall time finding the tensors to calibrate (ONNX shape inference)."""
    session_seconds: float = 0.0
    """Wall time creating the ONNX Runtime session (0 when no data pass was needed)."""
    weight_seconds: float = 0.0
    """Wall time binning weights (part of histogram_seconds)."""

    def names(self, *kinds: str) -> list[str]:
        """Tensor names of the given kinds (all when none are given), in graph order."""
        return [n for n in self.histograms if not kinds or self.kinds[n] in kinds]


# ------------------------------------------------------------------------------------------- session


def _has_external_data(model: Any) -> bool:
    from onnx import TensorProto

    if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        return True
    return any(
        attr.t.data_location == TensorProto.EXTERNAL
        for node in model.graph.node if is_constant(node) for attr in node.attribute if attr.name == "value"
    )


def _session(model: Any, expose: Sequence[str], model_dir: Path, providers: Sequence[str], threads: int,
             cuda_options: Mapping[str, str]) -> Any:
    """An InferenceSession on the model with `expose` added to its graph outputs (`model` is modified).

    The copy is serialised without external data; ONNX Runtime reads those weights from the original
    model's folder, so models with external data (and > 2 GB models) need no extra copy of the weights.
    """
    import onnx
    import onnxruntime as ort

    present = {o.name for o in model.graph.output}
    for name in expose:
        if name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))  # type left for ONNX Runtime to infer
    so = session_options(threads)
    if _has_external_data(model):
        so.add_session_config_entry(_EXTERNAL_FOLDER_KEY, str(model_dir.resolve()))
    data = model.SerializeToString()
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available] or [_CPU_EP]
    dropped = [p for p in providers if p not in available]
    if dropped:
        log.warning("execution provider(s) %s not available in this onnxruntime; calibrating with %s", dropped, chosen)
    if _CUDA_EP in chosen:
        try:
            with_options = [(_CUDA_EP, dict(cuda_options)) if p == _CUDA_EP else p for p in chosen]
            return ort.InferenceSession(data, sess_options=so, providers=with_options)
        except Exception as err:  # an onnxruntime that does not know an option: its defaults, said out loud
            log.warning("CUDA provider options %s refused (%s); calibrating with onnxruntime's CUDA defaults",
                        cuda_options, err)
    try:
        return ort.InferenceSession(data, sess_options=so, providers=chosen)
    except Exception as err:
        raise ModelError(f"onnxruntime cannot load the calibration copy of the model: {err}") from err


def session_options(threads: int) -> Any:
    """The onnxruntime SessionOptions of calibration's session (benchmarks/calibration_overhead.py times them)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    # Exposed tensors are graph outputs, which ONNX Runtime's optimisers preserve (a fusion never swallows
    # a graph output), so every level computes the tensors of the original graph; the full level is the
    # fastest on CPU.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Between runs the histograms use the cores; spinning ONNX Runtime threads would take CPU from them
    # (measured: ~10% more CPU time in total with spinning).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # No CPU arena: it would keep the largest run's buffers for the pass (allocation never changes the values).
    so.enable_cpu_mem_arena = False
    return so


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _float_output(arr: Any) -> bool:
    dtype = getattr(arr, "dtype", None)
    if dtype is None:
        return False
    kind = getattr(dtype, "kind", None)
    return kind == "f" or str(dtype) == "bfloat16"


# ------------------------------------------------------------------------------------------- collect


def collect_histograms(
    model: str | os.PathLike[str],
    dataset: Dataset,
    *,
    batch_size: int = 32,
    num_bins: int = DEFAULT_NUM_BINS,
    tensors: Sequence[str] | None = None,
    providers: Sequence[str] = (_CPU_EP,),
    on_batch: OnBatch | None = None,
    threads: int | None = None,
    max_run_bytes: int | None = DEFAULT_MAX_RUN_BYTES,
    cuda_options: Mapping[str, str] | None = None,
    on_weights: Callable[[Mapping[str, StreamingHistogram]], None] | None = None,
) -> CollectedStats:
    """Histogram |x| of every tensor that needs a scale over the whole dataset.

    Args:
        model: FP32 ONNX model (external data beside it is read where the model says).
        dataset: calibration data (see quantpipe.data.open_dataset), read batch by batch.
        batch_size: samples per ONNX Runtime run; the histograms do not depend on it.
        num_bins: bins of the TensorRT-style histogram the methods work on.
        tensors: restrict to these tensor names (default: every input, activation and weight).
        providers: ONNX Runtime execution providers; CUDA is used with IOBinding when available.
        on_batch: called after each batch with (samples done, total samples).
        threads: ONNX Runtime intra-op threads and histogram threads (default: the usable cores).
        max_run_bytes: on the CPU, split batches so that one run's activations stay under this
            (None: never split). The histograms are the same either way; only memory changes.
        cuda_options: onnxruntime CUDA provider options (default: CUDA_CALIBRATION_OPTIONS, true FP32).
        on_weights: called with the weights' histograms, final, before the data pass (a caller's search of
            them can run meanwhile; they are the histograms the result holds).

    Raises:
        ModelError: the model cannot be read or run. DataError: the data does not fit the model.
        CalibrationError: a tensor holds NaN, or a requested tensor does not exist. (A tensor holding +-Inf, an
            attention mask written with -inf, gets no histogram: it has no range to calibrate and stays in float.)
    """
    t0 = time.perf_counter()
    partial = collect_partial(model, dataset, batch_size=batch_size, num_bins=num_bins, tensors=tensors,
                              providers=providers, on_batch=on_batch, threads=threads, max_run_bytes=max_run_bytes,
                              cuda_options=cuda_options, on_weights=on_weights)
    return finish_stats(partial, time.perf_counter() - t0)


@dataclasses.dataclass
class Timing:
    """Where a data pass spent its wall time (summed over shards when the pass was sharded)."""

    inference: float = 0.0
    histogram: float = 0.0
    plan: float = 0.0
    session: float = 0.0
    weights: float = 0.0

    def plus(self, other: Timing) -> Timing:
        return Timing(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))


@dataclasses.dataclass
class PartialStats:
    """The raw histograms of one pass over (a shard of) the data, before Relu outputs are derived from their
    inputs: what a calibration shard returns. `merge` adds two shards exactly (histogram.py: the counts are a
    function of the data alone), and `finish_stats` turns the sum into CollectedStats."""

    kinds: dict[str, str]
    """tensor -> kind of every requested tensor, in graph order."""
    derived: dict[str, str]
    """Relu output -> its input, whose signed histogram gives the Relu's."""
    hists: dict[str, StreamingHistogram | SignedHistogram]
    num_samples: int
    num_batches: int
    timing: Timing
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    """Output of a Reshape-like node -> the tensor whose values it holds (`same_value_sources`): not run nor binned."""
    infinite: set[str] = dataclasses.field(default_factory=set)
    """Binned tensors that held +-Inf: they get no histogram (nor do the Relu outputs and aliases read from them)."""

    def merge(self, other: PartialStats) -> PartialStats:
        """Both shards' histograms added (same model and tensors; ValueError otherwise)."""
        if (list(self.kinds.items()) != list(other.kinds.items()) or self.derived != other.derived
                or self.aliases != other.aliases):
            raise ValueError("cannot merge calibration shards of different models or tensor sets")
        hists = {n: h.merge(other.hists[n]) for n, h in self.hists.items()}  # type: ignore[arg-type]
        return PartialStats(self.kinds, self.derived, hists, self.num_samples + other.num_samples,
                            self.num_batches + other.num_batches, self.timing.plus(other.timing), self.aliases,
                            self.infinite | other.infinite)


def collect_partial(
    model: str | os.PathLike[str],
    dataset: Dataset,
    *,
    batch_size: int = 32,
    num_bins: int = DEFAULT_NUM_BINS,
    tensors: Sequence[str] | None = None,
    providers: Sequence[str] = (_CPU_EP,),
    on_batch: OnBatch | None = None,
    threads: int | None = None,
    max_run_bytes: int | None = DEFAULT_MAX_RUN_BYTES,
    cuda_options: Mapping[str, str] | None = None,
    weights: bool = True,
    on_weights: Callable[[Mapping[str, StreamingHistogram]], None] | None = None,
) -> PartialStats:
    """`collect_histograms`' pass over `dataset` (a whole data set or one shard of it), before finishing.

    `weights`: histogram the weights too (exactly one shard of a sharded pass does; the others leave them empty);
    `on_weights`: as `collect_histograms` says.
    """
    path = Path(model)
    proto = _load(path)
    tp = time.perf_counter()
    plan = plan_tensors(proto)
    plan_seconds = time.perf_counter() - tp
    kinds = _requested_kinds(plan, tensors, path)
    # A Relu's output is not run through ONNX Runtime's outputs nor binned: its histogram is exactly the
    # positive side of its input's signed histogram (histogram.SignedHistogram), which costs far less.
    derived = {out: src for out, src in plan.relu_from.items() if out in kinds and src in kinds}
    # Likewise the output of a Reshape, Transpose, ... holds its input's values: its histogram is its input's.
    aliases = same_value_sources(proto, kinds, derived)
    hists = _new_histograms(kinds, {**derived, **aliases}, derived, num_bins)
    model_inputs = _model_inputs(proto, dataset)

    # Weights first, from their stored values; the model proto is then dropped before the data pass.
    tw = time.perf_counter()
    if weights:
        weight_hists = {n: h for n, h in hists.items() if kinds[n] == "weight" and isinstance(h, StreamingHistogram)}
        _weights_into(proto, path.parent, weight_hists)
        if on_weights is not None and weight_hists:
            on_weights(weight_hists)
    weight_seconds = time.perf_counter() - tw
    timing = Timing(histogram=weight_seconds, plan=plan_seconds, weights=weight_seconds)
    fetch = [n for n in plan.activations if n in kinds and n not in derived and n not in aliases]
    num_batches = 0
    infinite: set[str] = set()
    if fetch or any(k == "input" for k in kinds.values()):
        nthreads = threads or _default_threads()
        ts = time.perf_counter()
        session = _session(proto, fetch, path.parent, providers, nthreads,
                           CUDA_CALIBRATION_OPTIONS if cuda_options is None else cuda_options)
        timing.session = time.perf_counter() - ts
        del proto
        num_batches = _data_pass(session, dataset, fetch, kinds, hists, model_inputs, timing,
                                 batch_size=batch_size, threads=nthreads, providers=providers, on_batch=on_batch,
                                 max_run_bytes=max_run_bytes, sized_as={a: derived.get(s, s) for a, s in aliases.items()},
                                 infinite=infinite)
        del session
    return PartialStats(kinds, derived, hists, dataset.num_samples, num_batches, timing, aliases, infinite)


def finish_stats(partial: PartialStats, seconds: float) -> CollectedStats:
    """The CollectedStats of a finished pass (merged shards or one whole pass) that took `seconds`."""
    kept = _final_histograms(partial.kinds, partial.derived, partial.hists, partial.aliases, partial.infinite)
    t = partial.timing
    return CollectedStats(
        histograms=kept,
        kinds={n: partial.kinds[n] for n in kept},
        num_samples=partial.num_samples,
        num_batches=partial.num_batches,
        seconds=seconds,
        inference_seconds=t.inference,
        histogram_seconds=t.histogram,
        plan_seconds=t.plan,
        session_seconds=t.session,
        weight_seconds=t.weights,
    )


def _requested_kinds(plan: TensorPlan, tensors: Sequence[str] | None, path: Path) -> dict[str, str]:
    """tensor -> kind of the tensors to histogram: all of `plan`, or the requested ones (checked to exist)."""
    kinds = plan.kinds
    if tensors is None:
        return kinds
    unknown = [t for t in tensors if t not in kinds]
    if unknown:
        raise CalibrationError(
            f"tensor(s) {unknown} are not float inputs, node outputs or weights of {path}; "
            f"`quantpipe inspect {path}` lists the model's inputs and outputs."
        )
    wanted = set(tensors)
    return {n: k for n, k in kinds.items() if n in wanted}


def _new_histograms(
    kinds: Mapping[str, str], not_binned: Mapping[str, str], derived: Mapping[str, str], num_bins: int
) -> dict[str, StreamingHistogram | SignedHistogram]:
    """An empty histogram per binned tensor: signed for the source of a derived Relu output, else |x|."""
    signed = {src: SignedHistogram(num_bins) for src in derived.values()}
    return {n: signed.get(n) or StreamingHistogram(num_bins) for n in kinds if n not in not_binned}


SAME_VALUE_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
"""Ops whose output holds exactly the values of their first input (reordered or reshaped): the same histogram."""


def same_value_sources(proto: Any, kinds: Mapping[str, str], derived: Mapping[str, str]) -> dict[str, str]:
    """Activation -> the binned input or activation whose values it holds (through chains of SAME_VALUE_OPS).

    Only run-time sources qualify: a tensor computed from weights alone is binned once per run, unlike the
    weight itself. A Relu's source is binned with its signs (SignedHistogram), so it is never an alias.
    """
    sources = set(derived.values())
    aliases: dict[str, str] = {}
    for node in proto.graph.node:  # ONNX graphs are topologically sorted
        if node.op_type not in SAME_VALUE_OPS or node.domain not in ("", "ai.onnx") or not node.input or not node.output:
            continue
        out, src = node.output[0], node.input[0]
        src = aliases.get(src, src)
        if (kinds.get(out) == "activation" and kinds.get(src) in ("input", "activation") and out not in derived
                and out not in sources):
            aliases[out] = src
    return aliases


def _model_inputs(proto: Any, dataset: Dataset) -> list[str]:
    """The model's graph inputs (initializers aside), each of which the data must provide."""
    init_names = {i.name for i in proto.graph.initializer}
    model_inputs = [i.name for i in proto.graph.input if i.name not in init_names]
    missing = [n for n in model_inputs if n not in dataset.input_names]
    if missing:
        raise DataError(f"the calibration data has no arrays for model input(s) {missing} (it has {dataset.input_names}).")
    return model_inputs


def _final_histograms(
    kinds: Mapping[str, str], derived: Mapping[str, str], hists: Mapping[str, StreamingHistogram | SignedHistogram],
    aliases: Mapping[str, str], infinite: Iterable[str] = (),
) -> dict[str, StreamingHistogram]:
    """The |x| histogram of every tensor (Relu outputs from their source, aliases copied from theirs), in graph
    order, less those that saw no values and those that held +-Inf (with the Relu outputs and aliases of those)."""
    dropped = set(infinite)
    dropped |= {n for n, src in [*derived.items(), *aliases.items()] if src in dropped}
    if dropped:
        names = [n for n in kinds if n in dropped]
        log.info("%d tensor(s) hold +-Inf (an additive attention mask written with -inf): no range to calibrate, "
                 "they stay in float: %s", len(names), names[:8])
    final = cast(dict[str, StreamingHistogram], dict.fromkeys(kinds))  # every entry is set below, in this order
    for n in kinds:
        if n in aliases or n in dropped:
            continue
        if n in derived:
            final[n] = cast(SignedHistogram, hists[derived[n]]).relu()
        else:
            h = hists[n]
            final[n] = h.absolute() if isinstance(h, SignedHistogram) else h
    for n, src in aliases.items():  # sources are never aliases themselves
        if n not in dropped:
            final[n] = final[src].copy()
    for n in dropped:
        del final[n]
    empty = [n for n, h in final.items() if h.num_values == 0 and kinds[n] != "weight"]
    if empty:
        log.info("%d tensor(s) received no float values at run time and are left out: %s", len(empty), empty[:8])
    return {n: h for n, h in final.items() if h.num_values > 0}


def _load(path: Path) -> Any:
    from quantpipe.externaldata import strip_basepath
    from quantpipe.onnxgraph import load_onnx

    # The graph only (weights in external files stay there; `_session` gives onnxruntime their folder).
    return strip_basepath(load_onnx(path))


def _data_pass(
    session: Any,
    dataset: Dataset,
    fetch: Sequence[str],
    kinds: Mapping[str, str],
    hists: Mapping[str, StreamingHistogram | SignedHistogram],
    model_inputs: Sequence[str],
    timing: Timing,
    *,
    batch_size: int,
    threads: int,
    providers: Sequence[str],
    on_batch: OnBatch | None,
    max_run_bytes: int | None,
    sized_as: Mapping[str, str],
    infinite: set[str],
) -> int:
    """Run every batch and histogram its inputs and exposed outputs; return the number of runs.

    On the CPU a batch is split into runs whose activations stay under `max_run_bytes` (sized from the
    previous run): the histograms do not depend on how the data is batched, so memory can be bounded
    whatever batch size the caller chose. Tensors that held +-Inf are added to `infinite`. The size counts the aliases (`same_value_sources`) as if they were
    fetched, each as large as the tensor in `sized_as` (a fetched one or an input): the runs, and so the
    histograms of tensors that do not depend on the batch, are those of a pass that fetches them.
    """
    on_device = _CUDA_EP in providers and _CUDA_EP in session.get_providers()
    device = DeviceOutputs(session, fetch) if on_device and fetch else None
    wanted_inputs = [n for n in model_inputs if kinds.get(n) == "input"]
    binner = Binner(hists, threads, infinite)
    total = dataset.num_samples
    done = 0
    runs = 0
    per_run = 1 if max_run_bytes is not None and device is None else batch_size  # the first run measures
    try:
        for batch in dataset.batches(batch_size):
            lo = 0
            while lo < batch.size:
                hi = min(lo + per_run, batch.size)
                run = batch.feeds.rows(lo, hi)
                feeds = {k: run[k] for k in model_inputs}
                start = batch.start + lo
                t0 = time.perf_counter()
                try:
                    if device is not None:
                        outs = device.run(feeds)
                    elif fetch:
                        outs = list(zip(fetch, session.run(list(fetch), feeds), strict=True))
                    else:
                        outs = []
                except Exception as err:
                    several = any(v.shape and v.shape[0] > 1 for v in feeds.values())
                    raise CalibrationError(
                        f"onnxruntime failed on the calibration batch starting at sample {start} "
                        f"({_feeds_desc(feeds)}): {err}"
                        + (". If the model runs one sample at a time (a Reshape holding the exported batch), set "
                           "data.batch_size: 1 (--batch-size 1), or re-export it with a dynamic batch" if several
                           else "")
                    ) from err
                t1 = time.perf_counter()
                arrays = [(n, feeds[n]) for n in wanted_inputs] + [(n, a) for n, a in outs if _float_output(a)]
                binner.add(arrays, start)
                timing.inference += t1 - t0
                timing.histogram += time.perf_counter() - t1
                if max_run_bytes is not None and device is None:
                    nbytes = {n: int(getattr(a, "nbytes", 0)) for n, a in [*feeds.items(), *outs]}
                    fetched = sum(nbytes[n] for n, _ in outs) + sum(nbytes[n] for n in sized_as.values())
                    per_sample = max(1, fetched // (hi - lo))
                    per_run = max(1, min(batch_size, max_run_bytes // per_sample))
                done += hi - lo
                runs += 1
                lo = hi
                del outs, arrays, feeds  # one run's activations alive at a time
                if on_batch is not None:
                    on_batch(done, total)
    finally:
        binner.close()
    return runs


def _weights_into(model: Any, base_dir: Path, hists: Mapping[str, StreamingHistogram]) -> None:
    """Histogram weights one at a time from their stored values (external data read per tensor)."""
    from onnx import numpy_helper

    if not hists:
        return
    for init in model.graph.initializer:
        if init.name in hists:
            try:
                value = numpy_helper.to_array(init, base_dir=str(base_dir))
            except (OSError, ValueError) as err:
                raise ModelError(f"cannot read the values of weight '{init.name}' ({err}).") from err
            _update_weight(hists[init.name], init.name, value)
    for node in model.graph.node:
        if is_constant(node) and node.output and node.output[0] in hists:
            constant = constant_value(node, base_dir)
            if constant is not None:
                _update_weight(hists[node.output[0]], node.output[0], constant)


def _update_weight(hist: StreamingHistogram, name: str, value: np.ndarray) -> None:
    """A weight's histogram; none for a constant holding NaN or Inf, which models use on purpose (an open Clip
    bound, `torch.clamp(min=...)`'s +inf; an attention mask's -inf): it is not a range to calibrate."""
    value = np.asarray(value)
    if value.size and np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
        log.info("weight '%s' holds NaN or Inf (an open Clip bound or a mask): it gets no histogram", name)
        return
    hist.update(value)


def _feeds_desc(feeds: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k}{list(v.shape)} {v.dtype}" for k, v in feeds.items())
