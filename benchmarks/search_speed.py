"""How long the searches take: split choice, accuracy fallback and per-layer sensitivity, timed apart.

    python benchmarks/search_speed.py --bench .bench --out search_speed.json [--samples 63]
           [--searches split,fallback,sensitivity] [--splits EARLIER.json] [--profile DIR] [--work DIR]

It builds the pipeline `quantpipe run` would on EfficientNet-Lite0 of the open benchmark set (manifest.json:
`effnet_lite0/model.onnx`, `calib.npz` to calibrate and choose on, `eval.npz` to judge): pipeline.yaml's
defaults (calibration `use: auto`, bias correction, the non-negative shift, `split_activations: auto`) with
`build.fallback: {metric: top1_agreement, min: 0.99}` and the sensitivity analysis on, `--samples` samples of
each split. Calibration runs through the pipeline's own stage (reused from `--work` when given and unchanged)
and is not timed. Then, each timed on its own:

- ``split``: `choose_splits` (`split_activations: auto`);
- ``fallback``: `accuracy_fallback`, as the build stage calls it, with the split, the per-channel statistics and
  the output bias already filled in (so the split is not chosen twice; since session 10 the build stage measures
  the output bias before the fallback and hands it to the sensitivity stage: earlier numbers of this script
  include its measurement, about 4-5 s, in both searches);
- ``sensitivity``: `layer_sensitivity` of the fallback's model, as the pipeline's sensitivity stage calls it
  (without ``fallback`` among the searches: of the INT8 model with every layer quantized).

The JSON holds the seconds, the machine, and the results themselves (splits, the fallback's steps and kept
layers, the sensitivity table with every number as `float.hex`), so two trees' outputs compare exactly: run
it with `PYTHONPATH=<other tree>` for the other side, or give `--baseline <other tree>`: the same searches run first
with that tree's quantpipe (a subprocess, same workspace and splits), then with this one, back to back, and the JSON
holds both sides' seconds under `baseline` and whether every result is identical (`identical`, `differences`).
`--profile DIR` writes a cProfile `.prof` per search.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SEARCHES = ("split", "fallback", "sensitivity")


def _subset(src: Path, dst: Path, samples: int) -> None:
    with np.load(src) as d:
        np.savez(dst, **{k: d[k][:samples] for k in d.files})


def _pipeline(bench: Path, work: Path, samples: int) -> Path:
    """pipeline.yaml for EfficientNet-Lite0 in `work`, with `samples` samples of each split."""
    import yaml

    src = bench / "effnet_lite0"
    for split in ("calib", "eval"):
        if not (work / f"{split}.npz").is_file():
            _subset(src / f"{split}.npz", work / f"{split}.npz", samples)
    cfg = {
        "version": 1, "name": "search-speed",
        "model": {"path": str(src / "model.onnx"), "output": "logits"},
        "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"path": "eval.npz", "labels": "fp32_top1"},
                 "batch_size": 32},
        "calibration": {"methods": ["entropy", "minmax", "percentile", "mse"], "use": "auto", "device": "cpu"},
        "build": {"backends": {"onnxruntime": {"precisions": ["int8"], "device": "cpu"},
                               "tensorrt": {"enabled": False}},
                  "fallback": {"metric": "top1_agreement", "min": 0.99}},
        "evaluate": {"metrics": ["top1_agreement"], "sensitivity": {"enabled": True}},
        "report": {"dir": "reports"},
    }
    path = work / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _machine() -> dict[str, Any]:
    import onnxruntime

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "note": "wall seconds; the machine may have been shared with other jobs (say so with the numbers)"}


def _hex(x: float | None) -> str | None:
    return None if x is None else float(x).hex()


def _timed(name: str, fn: Any, profile: Path | None, seconds: dict[str, float]) -> Any:
    prof = cProfile.Profile() if profile else None
    t = time.perf_counter()
    if prof:
        prof.enable()
    try:
        return fn()
    finally:
        if prof:
            prof.disable()
        seconds[name] = round(time.perf_counter() - t, 2)
        print(f"search_speed: {name}: {seconds[name]:.1f} s", flush=True)
        if prof and profile:
            profile.mkdir(parents=True, exist_ok=True)
            prof.dump_stats(str(profile / f"{name}.prof"))


def run(bench: Path, work: Path, samples: int, searches: list[str], profile: Path | None,
        given_splits: dict[str, int] | None = None) -> dict[str, Any]:
    from quantpipe.config import load_config
    from quantpipe.fallback import accuracy_fallback
    from quantpipe.inputs import load_inputs
    from quantpipe.onnxgraph import load_onnx, named_copy
    from quantpipe.pipeline import stage_calibrate
    from quantpipe.quantize import QuantizeOptions, choose_splits, collect_channel_stats, with_calibration_data
    from quantpipe.sensitivity import layer_sensitivity
    from quantpipe.taskmetrics import TaskSpec
    from quantpipe.workspace import NullProgress, Workspace

    cfg = load_config(_pipeline(bench, work, samples))
    ws, li = Workspace.for_config(cfg), load_inputs(cfg)
    _, amax = stage_calibrate(cfg, ws, li, NullProgress())
    bs = cfg.data.batch_size
    model = load_onnx(li.spec.path)
    options = QuantizeOptions.from_config(cfg.build.quantize)
    options = dataclasses.replace(options, channel_stats=collect_channel_stats(named_copy(model), li.calib,
                                                                               batch_size=bs))
    seconds: dict[str, float] = {}
    res: dict[str, Any] = {"model": "EfficientNet-Lite0", "samples": samples, "machine": _machine(),
                           "seconds": seconds}
    if given_splits is not None and "split" not in searches:
        splits = given_splits
    else:
        splits = _timed("split", lambda: choose_splits(named_copy(model), amax, options, li.calib, batch_size=bs),
                        profile if "split" in searches else None, seconds)
        if "split" not in searches:
            del seconds["split"]
    res["splits"] = dict(sorted(splits.items()))
    options = dataclasses.replace(options, split_activations=splits)
    # The output bias too, measured once before the searches (untimed), as the build stage does since it hands
    # its options to the sensitivity stage.
    options = with_calibration_data(model, options, li.calib, batch_size=bs, amax=amax)
    out = work / "model.int8.onnx"
    if "fallback" in searches:
        fb = cfg.build.fallback
        assert fb is not None and fb.min is not None
        rep, fallback = _timed("fallback", lambda: accuracy_fallback(
            li.spec.path, amax, li.selection, out_path=out, metric=fb.metric, target=float(fb.min),
            keep_in=fb.keep_in, max_layers=fb.max_layers, output=li.output, batch_size=bs, options=options,
            calibration_data=li.calib, task=TaskSpec.from_config(cfg.evaluate)),
            profile, seconds)
        res["fallback"] = {"kept": [s.node for s in fallback.steps], "met": fallback.met,
                           "initial": _hex(fallback.initial), "final": _hex(fallback.final),
                           "steps": [[s.node, _hex(s.metric_before), _hex(s.metric_after)] for s in fallback.steps],
                           "quantized": len(rep.quantized_nodes)}
        import hashlib

        res["fallback"]["model_sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    if "sensitivity" in searches:
        s = cfg.evaluate.sensitivity
        # Without the fallback, the sensitivity of the INT8 model with every layer quantized (built inside).
        judged = str(out) if "fallback" in searches else ""
        rows = _timed("sensitivity", lambda: layer_sensitivity(
            li.spec.path, judged, amax, li.eval, output=li.output, max_samples=s.max_samples,
            one_at_a_time=s.one_at_a_time, batch_size=bs, options=options, calibration_data=li.calib,
            metric=s.metric, task=TaskSpec.from_config(cfg.evaluate)), profile, seconds)
        res["sensitivity"] = [[r.node, r.op_type, r.tensor, _hex(r.sqnr_db), _hex(r.output_metric), r.metric_name]
                              for r in rows]
    return res


def _baseline(tree: Path, argv: list[str], out: Path) -> dict[str, Any]:
    """The same benchmark with `tree`'s quantpipe, in a subprocess (its JSON)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree.resolve()), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, __file__, *argv, "--out", str(out)], env=env, check=True)
    return json.loads(out.read_text())


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The result keys (splits, fallback, sensitivity) on which two runs differ."""
    return [k for k in ("splits", "fallback", "sensitivity") if a.get(k) != b.get(k)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", type=Path, required=True, help="the open benchmark set (manifest.json's folder)")
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON of seconds and results")
    p.add_argument("--samples", type=int, default=63, help="calibration / selection and evaluation samples")
    p.add_argument("--searches", default=",".join(SEARCHES), help="comma-separated subset of " + ",".join(SEARCHES))
    p.add_argument("--profile", type=Path, help="write a cProfile .prof per timed search into this folder")
    p.add_argument("--splits", type=Path, help="take the split choice from this earlier output JSON (when 'split' "
                   "is not among --searches) instead of choosing it again")
    p.add_argument("--work", type=Path, help="workspace to keep (calibration is reused from it); default: a temp dir")
    p.add_argument("--baseline", type=Path, help="another quantpipe tree (its folder holding quantpipe/): run the "
                   "same searches with it first, then with this tree, back to back, and compare the results")
    args = p.parse_args(argv)
    searches = [s for s in args.searches.split(",") if s]
    unknown = set(searches) - set(SEARCHES)
    if unknown:
        p.error(f"unknown search(es) {sorted(unknown)}; choose from {','.join(SEARCHES)}")
    if not (args.bench / "effnet_lite0" / "model.onnx").is_file():
        p.error(f"{args.bench} holds no effnet_lite0/model.onnx; build the open set with shared/bench/build.sh")
    with tempfile.TemporaryDirectory(prefix="qp-search-speed-") as tmp:
        work = args.work or Path(tmp) / "work"
        work.mkdir(parents=True, exist_ok=True)
        base = None
        if args.baseline:
            same = ["--bench", str(args.bench), "--samples", str(args.samples), "--searches", ",".join(searches),
                    "--work", str(work), *(["--splits", str(args.splits)] if args.splits else [])]
            base = _baseline(args.baseline, same, Path(tmp) / "baseline.json")
        given = json.loads(args.splits.read_text())["splits"] if args.splits else None
        res = run(args.bench.resolve(), work.resolve(), args.samples, searches, args.profile, given)
    res["quantpipe"] = str(Path(sys.modules["quantpipe"].__file__ or "").parent)
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # this process's peak
    if base is not None:
        res["baseline"] = {"quantpipe": base["quantpipe"], "seconds": base["seconds"],
                           "peak_rss_mb": base.get("peak_rss_mb")}
        res["differences"] = _differences(base, res)
        res["identical"] = not res["differences"]
        print(f"search_speed: baseline {base['seconds']} -> this tree {res['seconds']}; "
              f"{'identical results' if res['identical'] else 'DIFFERENT: ' + ', '.join(res['differences'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"search_speed: wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
