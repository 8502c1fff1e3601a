"""Command line: `quantpipe run|calibrate|quantize|build|evaluate|report|gate|inspect|prepare|doctor|setup`.

The only place that configures logging, draws progress, and maps errors to exit codes:
0 pass, 1 gate failed, 2 bad input, 3 missing dependency, 4 a stage failed, 130 interrupted (SIGINT or SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantpipe import __version__
from quantpipe.cli_model import cmd_inspect, cmd_prepare
from quantpipe.console import RichProgress, console, print_summary
from quantpipe.errors import (
    EXIT_GATE_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STAGE_FAILED,
    ConfigError,
    QuantpipeError,
)

__all__ = ["main", "build_parser"]

log = logging.getLogger("quantpipe")


# --------------------------------------------------------------------------- logging


def _setup_logging(verbosity: int) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = RichHandler(console=console(stderr=True), show_time=False, show_path=verbosity > 0, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("quantpipe")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# --------------------------------------------------------------------------- commands


def _load(args: argparse.Namespace) -> Any:
    from quantpipe.config import load_config

    cfg = load_config(args.config)
    return cfg.model_copy(update={"execution": _execution(args, cfg.execution)})


def _execution(args: argparse.Namespace, base: Any = None) -> Any:
    """pipeline.yaml's `execution:` (or its defaults) with --workers / --engine / --ray-address applied."""
    from pydantic import ValidationError

    from quantpipe.config import ExecutionConfig

    merged = (base or ExecutionConfig()).model_dump()
    flags = {"workers": getattr(args, "workers", None), "engine": getattr(args, "engine", None),
             "address": getattr(args, "ray_address", None)}
    merged.update({k: v for k, v in flags.items() if v is not None})
    if flags["address"] is not None and flags["engine"] is None:
        merged["engine"] = "ray"  # --ray-address alone means Ray
    try:
        return ExecutionConfig.model_validate(merged)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'execution'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"--workers / --engine / --ray-address: {problems}.") from err


def _gate_exit(results: Any) -> int:
    if results.gate is not None and not results.gate.passed:
        return EXIT_GATE_FAILED
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from quantpipe.pipeline import run_stages
    from quantpipe.report import publish_ci

    cfg = _load(args)
    results, run_dir = run_stages(cfg, until="gate", progress=RichProgress(not args.quiet), run_id=args.run_id,
                                  baseline_dir=args.baseline)
    assert results is not None and run_dir is not None
    print_summary(results)
    for line in publish_ci(results, run_dir):
        print(line)
    console().print(f"report: {run_dir / 'report.html'}")
    return _gate_exit(results)


def cmd_stage(args: argparse.Namespace) -> int:
    from quantpipe.pipeline import run_stages

    cfg = _load(args)
    results, run_dir = run_stages(cfg, until=args.command, progress=RichProgress(not args.quiet), run_id=args.run_id)
    if results is not None:
        print_summary(results)
        console().print(f"results: {run_dir}")
    else:
        from quantpipe.pipeline import Workspace

        console().print(f"{args.command}: done; artifacts in {Workspace.for_config(cfg).root}")
    return EXIT_OK


def _resolve_run_dir(cfg: Any, run: Path | None) -> Path:
    from quantpipe.report import resolve_latest

    if run is not None:  # `--run reports/latest` where `latest` is a stale folder: what latest.txt names
        return (resolve_latest(run.parent) or run) if run.name == "latest" and not run.is_symlink() else run
    latest = resolve_latest(Path(cfg.report.dir))
    if latest is not None:
        return latest
    raise ConfigError(
        f"no earlier run found in {cfg.report.dir} (no 'latest'). Run `quantpipe run` first or pass --run reports/<run-id>."
    )


def cmd_report(args: argparse.Namespace) -> int:
    from quantpipe.pipeline import rewrite_report

    cfg = _load(args)
    run_dir = _resolve_run_dir(cfg, args.run)
    results = rewrite_report(cfg, run_dir, baseline_dir=args.baseline)
    print_summary(results)
    console().print(f"report: {run_dir / 'report.html'}")
    return EXIT_OK


def cmd_gate(args: argparse.Namespace) -> int:
    from quantpipe.pipeline import judge_run
    from quantpipe.report import publish_ci

    cfg = _load(args)
    run_dir = _resolve_run_dir(cfg, args.run)
    results = judge_run(cfg, run_dir, baseline_dir=args.baseline)
    print_summary(results)
    for line in publish_ci(results, run_dir):
        print(line)
    return _gate_exit(results)


def _batch_axes(given: Sequence[str], spec: Any) -> dict[str, int]:
    """--batch-axis NAME=AXIS options as {input: axis}; ConfigError (exit 2) for one that names no input or no axis."""
    axes = {}
    names = [t.name for t in spec.inputs]
    for item in given:
        name, _, axis = item.rpartition("=")
        if name not in names or not axis.isdigit():
            raise ConfigError(f"--batch-axis {item}: expected NAME=AXIS with NAME one of the model's inputs "
                              f"({', '.join(names)}) and AXIS a number (state=1 for an RNN state [layers, N, hidden]).")
        axes[name] = int(axis)
    return axes


def _standalone_dataset(model: Path, data: Path, max_samples: int | None,
                        batch_axis: Sequence[str] = ()) -> tuple[Any, Any]:
    from quantpipe.data import open_dataset
    from quantpipe.inputs import check_first_run
    from quantpipe.model import load_model_spec

    spec, _ = load_model_spec(model)
    axes = _batch_axes(batch_axis, spec)
    ds = open_dataset(data, spec.inputs, max_samples=max_samples, role="calibration", batch_axes=axes)
    inputs = check_first_run(model, spec, spec.inputs, ds, axes)
    if inputs != spec.inputs:
        ds = open_dataset(data, inputs, max_samples=max_samples, role="calibration", batch_axes=axes)
    return spec, ds


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.model is None and args.data is None:
        return cmd_stage(args)
    if args.model is None or args.data is None:
        raise ConfigError("standalone calibration needs both --model and --data (or pass a pipeline.yaml instead).")
    from quantpipe.calibration import calibrate_to_cache
    from quantpipe.execution import make_executor
    from quantpipe.workspace import advance_to

    spec, ds = _standalone_dataset(args.model, args.data, args.max_samples, args.batch_axis)
    progress = RichProgress(not args.quiet)
    methods = args.method or ["entropy"]
    executor = make_executor(_execution(args), gpu=args.device == "cuda")
    with contextlib.closing(executor), \
            progress.task(f"calibrating {spec.path} on {ds.num_samples} samples", ds.num_samples) as advance:
        written = calibrate_to_cache(
            spec.path, ds, methods=methods, cache=args.cache, batch_size=args.batch_size, percentile=args.percentile,
            trt_version=args.trt_version, device=args.device, on_batch=advance_to(advance),
            executor=executor,
        )
    for path in written:
        console().print(f"wrote {path}")
    return EXIT_OK


def cmd_quantize(args: argparse.Namespace) -> int:
    from quantpipe.quantize import QuantizeOptions, write_fp16_model, write_qdq_model

    if args.fp16 and args.from_cache is not None:
        raise ConfigError("--fp16 and --from-cache do not go together: a calibration cache holds INT8 scales. "
                          "Drop --fp16 for the INT8 Q/DQ model, or --from-cache for the FP16 model.")
    if args.fp16:
        from quantpipe.model import load_model_spec

        load_model_spec(args.model)
        ds = _standalone_dataset(args.model, args.data, args.max_samples, args.batch_axis)[1] if args.data else None
        fp16_rep = write_fp16_model(args.model, args.out, calibration_data=ds, batch_size=args.batch_size)
        kept = getattr(fp16_rep, "kept_fp32", ()) or ()
        from quantpipe.model import read_model_spec
        from quantpipe.modelinfo import describe_precision

        # Counted as `inspect` counts them (compute nodes; the writer's own count takes Constants, Casts and shape ops).
        totals = describe_precision(read_model_spec(args.out)[1]).totals
        console().print(f"wrote {args.out} (compute nodes: {', '.join(f'{n} {p}' for p, n in totals.items())}; "
                        f"{len(kept)} kept in FP32"
                        + (": " + "; ".join(f"{k.name} ({k.reason})" for k in kept[:5])
                           + (f" and {len(kept) - 5} more" if len(kept) > 5 else "") if kept else "") + ")")
        for w in getattr(fp16_rep, "warnings", ()) or ():
            log.warning("%s", w)
        return EXIT_OK
    # Flags left out keep QuantizeOptions' defaults, which are pipeline.yaml's (quantpipe.config).
    chosen = {"weight_rounding": args.weight_rounding, "split_activations": args.split_activations,
              "equalize_depthwise": args.equalize_depthwise}
    options = QuantizeOptions(per_channel=not args.per_tensor, shift_nonnegative=not args.no_shift,
                              **{k: v for k, v in chosen.items() if v is not None})
    if args.from_cache is not None:
        return _quantize_from_cache(args, options)
    if args.data is None:
        raise ConfigError("INT8 quantization needs calibration data: pass --data D.npz (or --fp16 for an FP16 model, "
                          "or --from-cache C for the scales of a TensorRT calibration cache).")
    from quantpipe.execution import make_executor

    spec, ds = _standalone_dataset(args.model, args.data, args.max_samples, args.batch_axis)
    executor = make_executor(_execution(args), gpu=args.device == "cuda")
    with contextlib.closing(executor):
        amax, options = _quantize_amax(args, spec.path, ds, options, executor)
        with RichProgress(not args.quiet).task("writing the INT8 model (statistics, split choice, bias correction)",
                                               None):
            rep = write_qdq_model(spec.path, amax, args.out, options, calibration_data=ds,
                                  batch_size=args.batch_size, executor=executor)
    # Its warnings were logged as the model was written (quantize_model): said once.
    from quantpipe.written_check import say_written

    say_written(spec, Path(args.out), rep, ds, args.batch_size)
    return EXIT_OK


def _quantize_from_cache(args: argparse.Namespace, options: Any) -> int:
    """`quantpipe quantize --from-cache C`: a TensorRT <= 10 cache's scales, exactly, in a Q/DQ model (migrate.py)."""
    from quantpipe.migrate import migrate_cache
    from quantpipe.model import load_model_spec

    spec, ds = (_standalone_dataset(args.model, args.data, args.max_samples, args.batch_axis) if args.data is not None
                else (load_model_spec(args.model)[0], None))
    method = None if args.method == "auto" else args.method
    with RichProgress(not args.quiet).task("calibrating the tensors the cache lacks" if ds is not None else
                                           "writing the Q/DQ model", ds.num_samples if ds is not None else None) as advance:
        rep, migration = migrate_cache(spec.path, args.from_cache, args.out, options, calibration_data=ds,
                                       batch_size=args.batch_size, percentile=args.percentile, device=args.device,
                                       method=method, on_batch=lambda done, total: advance(done))
    for line in migration.lines():
        console().print(line, markup=False)
    console().print(f"wrote {args.out} ({len(rep.quantized_nodes)} nodes quantized)")
    for w in rep.warnings:
        log.warning("%s", w)
    return EXIT_OK


def _quantize_amax(args: argparse.Namespace, model_path: Path, ds: Any, options: Any, executor: Any
                   ) -> tuple[dict[str, float], Any]:
    """The activation ranges of `quantpipe quantize --method M` and the options to write with; `auto` chooses
    per tensor by output effect, its runs on `executor`'s workers when they are work enough (and hands on the
    per-channel statistics it collected, so they are not collected twice)."""
    from quantpipe.calibration import calibrate_tables_in_memory
    from quantpipe.workspace import advance_to

    progress = RichProgress(not args.quiet)
    methods = ["entropy", "minmax", "percentile", "mse", "best"] if args.method == "auto" else [args.method]
    with progress.task(f"calibrating ({args.method}) on {ds.num_samples} samples", ds.num_samples) as advance:
        tables = calibrate_tables_in_memory(model_path, ds, methods=methods, batch_size=args.batch_size,
                                            percentile=args.percentile, device=args.device,
                                            on_batch=advance_to(advance))
    if args.method != "auto":
        return tables[args.method], options
    import dataclasses

    from quantpipe.onnxgraph import load_onnx
    from quantpipe.quantize.range_search import choose_ranges

    with progress.task("choosing each activation's range (auto: candidates measured on the model output)", None):
        choice = choose_ranges(load_onnx(model_path), tables, options, ds, batch_size=args.batch_size,
                               executor=executor)
    s = choice.summary()
    console().print(f"auto ranges: {s['per_method']} per tensor; kept {s['winner']} "
                     f"({', '.join(f'{k} {v} dB' for k, v in s['model_db'].items())}; {s['seconds']} s)")
    if options.channel_stats is None and choice.channel_stats is not None:
        options = dataclasses.replace(options, channel_stats=choice.channel_stats)
    return choice.amax, options


def cmd_doctor(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from quantpipe.deps import doctor_lines, probe_env

    env = probe_env()
    out = console()
    for ok, text in doctor_lines(env):
        out.print(("[green]✓[/green] " if ok else "[yellow]✗[/yellow] ") + escape(text))
    return EXIT_OK


def cmd_setup(args: argparse.Namespace) -> int:
    """`quantpipe setup modelopt`: ModelOpt in a venv of its own (README, "NVIDIA ModelOpt")."""
    from rich.markup import escape

    from quantpipe.backends.modelopt.install import install_modelopt

    err = console(stderr=True)
    env, seconds = install_modelopt(venv=args.dir, base_python=args.python, torch_index=args.torch_index,
                                    force=args.force, on_line=lambda line: err.print(f"[dim]{escape(line)}[/dim]"))
    console().print(f"[green]✓[/green] ModelOpt {escape(str(env.version))} ready in {escape(str(env.python))} "
                     f"({seconds:.0f} s); quantpipe finds it there (build.backends.modelopt.enabled: true)")
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def _with_config(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config", nargs="?", type=Path, default=Path("pipeline.yaml"), help="pipeline file (default: ./pipeline.yaml)")


def _add_execution_options(sp: argparse.ArgumentParser) -> None:
    """--workers / --engine / --ray-address: override pipeline.yaml's `execution:` (defaults: quantpipe.config)."""
    sp.add_argument("--workers", type=int, help="workers the stages shard their work over (default: execution.workers, "
                                                "else the cores, or the GPUs; 1: no pool)")
    sp.add_argument("--engine", choices=["local", "ray"], help="local worker processes, or Ray tasks (execution.engine)")
    sp.add_argument("--ray-address", help="Ray cluster to run on (auto, ray://host:port); implies --engine ray")


def _add_data_options(sp: argparse.ArgumentParser) -> None:
    """Calibration options of the standalone commands; their defaults are pipeline.yaml's (quantpipe.config)."""
    from quantpipe.config import CalibrationConfig, DataConfig

    cal, data = CalibrationConfig.model_fields, DataConfig.model_fields
    sp.add_argument("--batch-size", type=int, default=data["batch_size"].default)
    sp.add_argument("--percentile", type=float, default=cal["percentile"].default)
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"], default=cal["device"].default)
    sp.add_argument("--max-samples", type=int)
    sp.add_argument("--batch-axis", action="append", default=[], metavar="NAME=AXIS",
                    help="an input whose samples are stacked on another axis (an RNN state [layers, N, hidden]: "
                         "state=1); repeatable (model.inputs.<name>.batch_axis in pipeline.yaml)")


def _add_calibrate(sub: Any, common: argparse.ArgumentParser) -> None:
    from quantpipe.config import CalibrationConfig

    c = sub.add_parser("calibrate", parents=[common], help="calibrate from pipeline.yaml, or standalone with --model/--data")
    _with_config(c)
    c.add_argument("--model", type=Path, help="FP32 ONNX model (standalone mode)")
    c.add_argument("--data", type=Path, help=".npz with one array per input, or a folder of per-sample .npz")
    c.add_argument("--method", action="append", choices=["entropy", "minmax", "percentile", "mse"], help="repeatable; default entropy")
    c.add_argument("--cache", type=Path, default=Path("calibration.cache"), help="TensorRT cache to write (JSON lands beside it)")
    c.add_argument("--trt-version", default=CalibrationConfig.model_fields["trt_version"].default,
                   help="TensorRT version for the cache header")
    _add_data_options(c)
    _add_execution_options(c)
    c.add_argument("--run-id", help=argparse.SUPPRESS)
    c.set_defaults(func=cmd_calibrate)


def _add_quantize(sub: Any, common: argparse.ArgumentParser) -> None:
    from quantpipe.config import CalibrationConfig

    q = sub.add_parser("quantize", parents=[common], help="write an INT8 Q/DQ model (or --fp16 an FP16 model) without a pipeline.yaml")
    q.add_argument("--model", type=Path, required=True)
    q.add_argument("--data", "--calibration-data", type=Path)
    q.add_argument("--method", choices=["auto", "entropy", "minmax", "percentile", "mse", "best"],
                   default=CalibrationConfig().use,
                   help="auto (default): per tensor, the candidate range (entropy/minmax/percentile/mse) with the least "
                        "effect on the output, checked against each single method on the whole INT8 model; "
                        "entropy: TensorRT's scales, exactly")
    q.add_argument("--out", "-o", type=Path, required=True)
    q.add_argument("--fp16", action="store_true", help="write the FP16 model instead (with --data, activations that "
                   "overflow FP16 stay FP32)")
    q.add_argument("--from-cache", type=Path, metavar="CACHE",
                   help="TensorRT <= 10 / trtexec / Polygraphy / TAO calibration cache (or TAO's calibration JSON): its "
                        "scales, exactly, in the "
                        "Q/DQ model TensorRT 11 builds; tensors it lacks are calibrated from --data if given "
                        "(--method, default: the cache's calibrator), else left in float (README, 'Migrating')")
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales instead of per-channel")
    q.add_argument("--weight-rounding", choices=["nearest", "gptq"],
                   help="gptq: fit the int8 weight codes to each layer's calibration inputs (slower); default: "
                        "build.quantize.weight_rounding's default")
    q.add_argument("--no-shift", action="store_true",
                   help="quantize post-ReLU activations symmetrically about 0 (default: around mid-range, see README)")
    q.add_argument("--equalize-depthwise", action=argparse.BooleanOptionalAction, default=None,
                   help="give every input channel of a depthwise Conv the tensor's largest range (exact; README); "
                        "default: build.quantize.equalize_depthwise's default")
    q.add_argument("--split-activations", choices=["auto", "off"],
                   help="auto: an activation whose int8 rounding dominates the output error is quantized in pieces "
                        "where that measurably helps (README); default: build.quantize.split_activations' default")
    _add_data_options(q)
    _add_execution_options(q)
    q.set_defaults(func=cmd_quantize)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="quantpipe",
        description="FP32 ONNX -> calibrated INT8/FP16 ONNX Runtime models and TensorRT engines, evaluated, reported and gated.",
        epilog="Exit codes: 0 pass, 1 gate failed, 2 bad input, 3 missing dependency, 4 a stage failed, 130 interrupted.",
    )
    p.add_argument("--version", action="version", version=f"quantpipe {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings and results only, no progress")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error (for bug reports)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", parents=[common], help="every stage: calibrate, build, evaluate, report, gate")
    _with_config(r)
    r.add_argument("--run-id", help="name of the run directory under report.dir (default: UTC timestamp)")
    r.add_argument("--baseline", type=Path, help="earlier run directory to compare with (overrides report.baseline)")
    _add_execution_options(r)
    r.set_defaults(func=cmd_run)
    _add_calibrate(sub, common)
    _add_quantize(sub, common)

    for name, helptext in (("build", "calibrate (or reuse) and build every variant"),
                           ("evaluate", "... and evaluate every variant into a new run directory")):
        s = sub.add_parser(name, parents=[common], help=helptext)
        _with_config(s)
        s.add_argument("--run-id", help="run directory name (evaluate)")
        _add_execution_options(s)
        s.set_defaults(func=cmd_stage)

    rp = sub.add_parser("report", parents=[common], help="(re)write the report files of a run")
    _with_config(rp)
    rp.add_argument("--run", type=Path, help="run directory (default: reports/latest)")
    rp.add_argument("--baseline", type=Path, help="earlier run directory to compare with")
    rp.set_defaults(func=cmd_report)

    g = sub.add_parser("gate", parents=[common], help="judge a run with pipeline.yaml's gate rules; exit 0/1")
    _with_config(g)
    g.add_argument("--run", type=Path, help="run directory (default: reports/latest)")
    g.add_argument("--baseline", type=Path, help="earlier run directory for baseline rules")
    g.set_defaults(func=cmd_gate)

    i = sub.add_parser("inspect", parents=[common], help="inputs, outputs, opset, op counts and precision (FP32, FP16 or Q/DQ INT8) of an ONNX model")
    i.add_argument("model", type=Path)
    i.set_defaults(func=cmd_inspect)

    pr = sub.add_parser("prepare", parents=[common], help="bake fixed inputs in and fold the If branches they decide "
                        "(layers inside an If stay float), sort the nodes; checked against the original with --data")
    pr.add_argument("model", type=Path)
    pr.add_argument("out", type=Path)
    pr.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE", help="an input the deployment always "
                    "feeds this value (e.g. sr=16000): it becomes a constant")
    pr.add_argument("--shape", action="append", default=[], metavar="NAME=D1,D2,...", help="sizes of an input's free "
                    "axes where the deployment fixes them ('?' keeps one free), so conditions on them fold")
    pr.add_argument("--data", type=Path, help="npz data: every output compared with the original's on its first batch")
    pr.add_argument("--to-fp32", action="store_true", help="a model shipped in FP16: every FP16 value and type to FP32")
    pr.add_argument("--batch-axis", action="append", default=[], metavar="NAME=AXIS",
                    help="an input of --data whose samples are stacked on another axis (state=1)")
    pr.set_defaults(func=cmd_prepare)

    d = sub.add_parser("doctor", parents=[common], help="what this machine can run, and how to install what is missing")
    d.set_defaults(func=cmd_doctor)

    st = sub.add_parser("setup", parents=[common], help="install an optional tool quantpipe runs out of process (modelopt)")
    st.add_argument("tool", choices=["modelopt"], help="modelopt: nvidia-modelopt[onnx] in a venv under your cache")
    st.add_argument("--dir", type=Path, help="the venv folder (default: $XDG_CACHE_HOME/quantpipe/modelopt-<version>; "
                    "elsewhere, point build.backends.modelopt.python at its interpreter)")
    st.add_argument("--python", default=sys.executable, help="the Python that makes the venv (default: this one)")
    st.add_argument("--torch-index", help="the pip index to take torch from first, e.g. PyTorch's CPU wheel index on Linux "
                    "x86-64 (about 200 MB instead of ~2.5 GB of CUDA wheels); default: the indexes pip is set up with")
    st.add_argument("--force", action="store_true", help="reinstall even when a checked venv is there")
    st.set_defaults(func=cmd_setup)
    return p


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (a CI job cancelled or timed out) cleans up as Ctrl-C does


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    import signal
    import threading

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    # SIGTERM killed the run where it stood: a .partial folder left, the workers orphaned (found probing).
    previous = (signal.signal(signal.SIGTERM, _terminated)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        return _main(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    err = console(stderr=True)
    try:
        return int(args.func(args))
    except QuantpipeError as e:
        from rich.markup import escape

        err.print(f"[bold red]error:[/bold red] {escape(str(e))}")
        if getattr(args, "debug", False):
            err.print_exception()
        return e.exit_code
    except OSError as e:  # the file system refused (disk full, permissions changed mid-run): not a bug
        from rich.markup import escape

        from quantpipe.errors import os_error_message

        err.print(f"[bold red]error:[/bold red] {escape(os_error_message(e, 'reading or writing'))}")
        if getattr(args, "debug", False):
            err.print_exception()
        return EXIT_STAGE_FAILED
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: finished artifacts were kept; nothing half-written was left behind.")
        return EXIT_INTERRUPTED
    except Exception:  # a bug, not a user error: show the traceback
        err.print_exception()
        err.print("[bold red]internal error[/bold red]: please report it with the traceback above.")
        return EXIT_STAGE_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
