"""Command line: `quantpipe run|calibrate|quantize|build|evaluate|report|gate|inspect|doctor`.

The only place that configures logging, draws progress, and maps errors to exit codes:
0 pass, 1 gate failed, 2 bad input, 3 missing dependency, 4 a stage failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from quantpipe import __version__
from quantpipe.errors import (
    EXIT_GATE_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STAGE_FAILED,
    ConfigError,
    QuantpipeError,
)

__all__ = ["main", "build_parser", "print_summary", "collapse_lines"]

log = logging.getLogger("quantpipe")


# --------------------------------------------------------------------------- console, progress


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


class RichProgress:
    """quantpipe.pipeline.Progress drawn with rich (transient bars on stderr, one line per finished task)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.err = _console(stderr=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        import time

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        start = time.perf_counter()
        if not self.enabled:  # -q: warnings and results only
            yield lambda n: None
            return
        if not self.err.is_terminal:  # a CI log: no bars, one line per finished task
            yield lambda n: None
            self.err.print(f"[dim]•[/dim] {description} [dim]({time.perf_counter() - start:.1f} s)[/dim]")
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=self.err, transient=True) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda n: bar.advance(tid, n)
        self.err.print(f"[green]✓[/green] {description} [dim]({time.perf_counter() - start:.1f} s)[/dim]")


def _setup_logging(verbosity: int) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = RichHandler(console=_console(stderr=True), show_time=False, show_path=verbosity > 0, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("quantpipe")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# --------------------------------------------------------------------------- summaries


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "—"
    if metric in ("top1", "top5", "top1_agreement", "top1_drop", "top5_drop"):
        return f"{100 * v:.2f}%"
    if metric == "cosine":
        return f"{v:.4f}"
    if metric == "sqnr_db":
        return f"{v:.1f}dB"
    return f"{v:.4g}"


def print_summary(results: Any) -> None:
    """Variants table and the gate verdict, on stdout."""
    from rich.markup import escape
    from rich.table import Table

    out = _console()
    for line in collapse_lines(results):
        out.print(line)
    table = Table(title=f"quantpipe · {Path(results.model.path).name} · run {results.run_id}", title_justify="left")
    cols = {"top1": "top1", "top1_agreement": "agree", "cosine": "cosine", "sqnr_db": "SQNR"}
    table.add_column("variant", no_wrap=True)
    table.add_column("dev", no_wrap=True)
    for head in cols.values():
        table.add_column(head, justify="right", no_wrap=True)
    bs_all = sorted({lat.batch_size for e in results.evaluations for lat in e.latency})
    for bs in bs_all:
        table.add_column(f"ms@{bs}", justify="right", no_wrap=True)
    table.add_column("MB", justify="right", no_wrap=True)
    variants = {v.name: v for v in results.variants}
    skipped: dict[str, list[str]] = {}
    for e in results.evaluations:
        v = variants[e.variant]
        if e.skipped:
            table.add_row(e.variant, v.device, "[yellow]skipped[/yellow]", *["—"] * (len(cols) - 1 + len(bs_all) + 1))
            skipped.setdefault(e.skipped, []).append(e.variant)
            continue
        lat = {lat.batch_size: lat for lat in e.latency}
        table.add_row(
            e.variant, v.device, *[_fmt(c, e.metrics.get(c)) for c in cols],
            *[f"{lat[b].median_ms:.2f}" if b in lat else "—" for b in bs_all],
            f"{v.size_bytes / 1e6:.2f}" if v.size_bytes else "—",
        )
    out.print(table)
    for reason, names in skipped.items():
        out.print(f"  [yellow]skipped[/yellow] {escape(', '.join(names))}: {escape(reason)}")
    if results.gate is not None:
        for o in results.gate.outcomes:
            mark = "[green]PASS[/green]" if o.passed else "[red]FAIL[/red]"
            out.print(f"  {mark} {escape(o.message)}")
        out.print(_gate_line(results.gate))


def collapse_lines(results: Any) -> list[str]:
    """Rich-markup lines for each collapsed INT8 variant (printed first): what, likely cause, the YAML to paste."""
    from rich.markup import escape

    lines = []
    for c in getattr(results, "collapse", ()):
        lines.append(f"[bold red]INT8 COLLAPSED: {escape(c.variant)}[/bold red]: {escape('; '.join(c.problems))}.")
        lines.append(f"  likely cause: {escape(c.cause)}")
        lines.append(f"  fix: {escape(c.fix)}")
        lines += [f"    {escape(line)}" for line in c.fix_yaml.splitlines()]
    return lines


def _gate_line(gate: Any) -> str:
    """The verdict line: how many rules failed (or that all passed), in the words of the report's verdict."""
    n = len(gate.outcomes)
    failed = sum(not o.passed for o in gate.outcomes)
    rules = f"rule{'s' if n != 1 else ''}"
    if not gate.passed:
        return f"[bold red]gate FAILED[/bold red] ({failed} of {n} {rules} failed)" if failed else \
            "[bold red]gate FAILED[/bold red]"
    return f"[bold green]gate passed[/bold green] (all {n} {rules} passed)" if n else \
        "[bold green]gate passed[/bold green] (no rules)"


# --------------------------------------------------------------------------- commands


def _load(args: argparse.Namespace) -> Any:
    from quantpipe.config import load_config

    return load_config(args.config)


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
    _console().print(f"report: {run_dir / 'report.html'}")
    return _gate_exit(results)


def cmd_stage(args: argparse.Namespace) -> int:
    from quantpipe.pipeline import run_stages

    cfg = _load(args)
    results, run_dir = run_stages(cfg, until=args.command, progress=RichProgress(not args.quiet), run_id=args.run_id)
    if results is not None:
        print_summary(results)
        _console().print(f"results: {run_dir}")
    else:
        from quantpipe.pipeline import Workspace

        _console().print(f"{args.command}: done; artifacts in {Workspace.for_config(cfg).root}")
    return EXIT_OK


def _resolve_run_dir(cfg: Any, run: Path | None) -> Path:
    from quantpipe.report import resolve_latest

    if run is not None:
        return run
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
    _console().print(f"report: {run_dir / 'report.html'}")
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


def _standalone_dataset(model: Path, data: Path, max_samples: int | None) -> tuple[Any, Any]:
    from quantpipe.data import open_dataset
    from quantpipe.model import load_model_spec

    spec, _ = load_model_spec(model)
    return spec, open_dataset(data, spec.inputs, max_samples=max_samples, role="calibration")


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.model is None and args.data is None:
        return cmd_stage(args)
    if args.model is None or args.data is None:
        raise ConfigError("standalone calibration needs both --model and --data (or pass a pipeline.yaml instead).")
    from quantpipe.calibration import calibrate_to_cache

    spec, ds = _standalone_dataset(args.model, args.data, args.max_samples)
    progress = RichProgress(not args.quiet)
    methods = args.method or ["entropy"]
    with progress.task(f"calibrating {spec.path} on {ds.num_samples} samples", ds.num_samples) as advance:
        written = calibrate_to_cache(
            spec.path, ds, methods=methods, cache=args.cache, batch_size=args.batch_size, percentile=args.percentile,
            trt_version=args.trt_version, device=args.device, on_batch=lambda done, total: advance(done),
        )
    for path in written:
        _console().print(f"wrote {path}")
    return EXIT_OK


def cmd_quantize(args: argparse.Namespace) -> int:
    from quantpipe.quantize import QuantizeOptions, write_fp16_model, write_qdq_model

    if args.fp16:
        from quantpipe.model import load_model_spec

        load_model_spec(args.model)
        rep = write_fp16_model(args.model, args.out)
        _console().print(f"wrote {args.out}")
        for w in getattr(rep, "warnings", ()) or ():
            log.warning("%s", w)
        return EXIT_OK
    if args.data is None:
        raise ConfigError("INT8 quantization needs calibration data: pass --data D.npz (or --fp16 for an FP16 model).")
    spec, ds = _standalone_dataset(args.model, args.data, args.max_samples)
    # Flags left out keep QuantizeOptions' defaults, which are pipeline.yaml's (quantpipe.config).
    chosen = {"weight_rounding": args.weight_rounding, "split_activations": args.split_activations}
    options = QuantizeOptions(per_channel=not args.per_tensor, shift_nonnegative=not args.no_shift,
                              **{k: v for k, v in chosen.items() if v is not None})
    amax, options = _quantize_amax(args, spec.path, ds, options)
    rep = write_qdq_model(spec.path, amax, args.out, options, calibration_data=ds, batch_size=args.batch_size)
    _console().print(f"wrote {args.out} ({len(getattr(rep, 'quantized_nodes', ()) or ())} nodes quantized)")
    for w in getattr(rep, "warnings", ()) or ():
        log.warning("%s", w)
    return EXIT_OK


def _quantize_amax(args: argparse.Namespace, model_path: Path, ds: Any, options: Any) -> tuple[dict[str, float], Any]:
    """The activation ranges of `quantpipe quantize --method M` and the options to write with; `auto` chooses
    per tensor by output effect (and hands on the per-channel statistics it collected, so they are not
    collected twice)."""
    from quantpipe.calibration import calibrate_tables_in_memory

    progress = RichProgress(not args.quiet)
    methods = ["entropy", "minmax", "percentile", "mse", "best"] if args.method == "auto" else [args.method]
    with progress.task(f"calibrating ({args.method}) on {ds.num_samples} samples", ds.num_samples) as advance:
        tables = calibrate_tables_in_memory(model_path, ds, methods=methods, batch_size=args.batch_size,
                                            percentile=args.percentile, device=args.device,
                                            on_batch=lambda done, total: advance(done))
    if args.method != "auto":
        return tables[args.method], options
    import dataclasses

    from quantpipe.onnxgraph import load_onnx
    from quantpipe.quantize.range_search import choose_ranges

    choice = choose_ranges(load_onnx(model_path), tables, options, ds, batch_size=args.batch_size)
    s = choice.summary()
    _console().print(f"auto ranges: {s['per_method']} per tensor; kept {s['winner']} "
                     f"({', '.join(f'{k} {v} dB' for k, v in s['model_db'].items())}; {s['seconds']} s)")
    if options.channel_stats is None and choice.channel_stats is not None:
        options = dataclasses.replace(options, channel_stats=choice.channel_stats)
    return choice.amax, options


def cmd_inspect(args: argparse.Namespace) -> int:
    """Describe any valid ONNX model: the FP32 export, or the FP16 / INT8 (Q/DQ) model you ship."""
    from rich.markup import escape
    from rich.table import Table

    from quantpipe.model import read_model_spec
    from quantpipe.modelinfo import describe_precision

    spec, proto = read_model_spec(args.model)
    info = describe_precision(proto)
    out = _console()
    out.print(f"[bold]{escape(spec.path)}[/bold]  opset {spec.opset} · IR {spec.ir_version} · "
              f"{escape(spec.producer or 'unknown producer')}")
    out.print(f"{spec.num_parameters:,} parameters · {spec.size_bytes / 1e6:.2f} MB · sha256 {spec.sha256[:16]}…")
    compute = ", ".join(f"{n} {p}" for p, n in info.totals.items())
    out.print(f"precision: {info.kind} · compute nodes: {compute or 'none'}")
    t = Table("", "name", "dtype", "shape", title="inputs and outputs", title_justify="left")
    for kind, items in (("input", spec.inputs), ("output", spec.outputs)):
        for i in items:
            t.add_row(kind, escape(i.name), i.dtype, escape("[" + ", ".join("?" if d is None else str(d) for d in i.shape) + "]"))
    out.print(t)
    columns = [p for p in ("fp32", "fp16", "int8", "other") if info.totals.get(p)]
    ops = Table("op", "count", *columns, title="operators, by compute precision", title_justify="left")
    for col in ops.columns[1:]:
        col.justify = "right"
    for op, per in info.by_op.items():
        ops.add_row(op, str(spec.op_counts.get(op, sum(per.values()))), *[str(per.get(c) or "·") for c in columns])
    for op in (op for op in spec.op_counts if op not in info.by_op):  # Q/DQ, Cast: they convert, not compute
        ops.add_row(f"[dim]{op}[/dim]", str(spec.op_counts[op]), *["[dim]converts[/dim]", *[""] * (len(columns) - 1)][:len(columns)])
    out.print(ops)
    for line in _precision_lines(info):
        out.print(escape(line))
    return EXIT_OK


def _precision_lines(info: Any) -> list[str]:
    """Q/DQ, scales, casts and quantpipe metadata of a `modelinfo.ModelPrecision`, one fact per line."""
    q = info.qdq
    lines = []
    if q.quantize or q.dequantize:
        lines.append(f"Q/DQ: {q.quantize} QuantizeLinear, {q.dequantize} DequantizeLinear ({q.per_channel} per-channel, "
                     f"{q.per_tensor} per-tensor; {q.weight_dequantize} dequantize stored weights)")
        for what, rng in (("weight", q.weight_scales), ("activation", q.activation_scales)):
            if rng is not None:
                lines.append(f"{what} scales: min {rng[0]:.4g}, max {rng[1]:.4g}")
        zero = (f"{q.nonzero_zero_points} Q/DQ node(s) with a non-zero zero point ({q.zero_point_min} .. {q.zero_point_max})"
                if q.nonzero_zero_points else "all 0")
        lines.append(f"zero points: {'/'.join(q.zero_point_types) or 'none'}; {zero}")
    else:
        lines.append("Q/DQ: none")
    casts = [f"{n} to {p}" for p, n in (("fp16", info.casts_to_fp16), ("fp32", info.casts_to_fp32),
                                        ("another type", info.casts_other)) if n]
    lines.append(f"casts: {', '.join(casts) if casts else 'none'}")
    meta = ", ".join(f"{k} ({v})" for k, v in info.quantpipe_metadata.items())
    lines.append(f"quantpipe metadata: {meta}" if meta else "quantpipe metadata: none")
    if q.quantize or q.dequantize:
        from quantpipe.modelinfo import int8_run_lines

        lines.extend(int8_run_lines())
    return lines


def cmd_doctor(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from quantpipe.deps import doctor_lines, probe_env

    env = probe_env()
    out = _console()
    for ok, text in doctor_lines(env):
        out.print(("[green]✓[/green] " if ok else "[yellow]✗[/yellow] ") + escape(text))
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def _with_config(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config", nargs="?", type=Path, default=Path("pipeline.yaml"), help="pipeline file (default: ./pipeline.yaml)")


def _add_data_options(sp: argparse.ArgumentParser) -> None:
    """Calibration options of the standalone commands; their defaults are pipeline.yaml's (quantpipe.config)."""
    from quantpipe.config import CalibrationConfig, DataConfig

    cal, data = CalibrationConfig.model_fields, DataConfig.model_fields
    sp.add_argument("--batch-size", type=int, default=data["batch_size"].default)
    sp.add_argument("--percentile", type=float, default=cal["percentile"].default)
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"], default=cal["device"].default)
    sp.add_argument("--max-samples", type=int)


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
    c.add_argument("--run-id", help=argparse.SUPPRESS)
    c.set_defaults(func=cmd_calibrate)


def _add_quantize(sub: Any, common: argparse.ArgumentParser) -> None:
    from quantpipe.config import CalibrationConfig

    q = sub.add_parser("quantize", parents=[common], help="write an INT8 Q/DQ model (or --fp16 an FP16 model) without a pipeline.yaml")
    q.add_argument("--model", type=Path, required=True)
    q.add_argument("--data", type=Path)
    q.add_argument("--method", choices=["auto", "entropy", "minmax", "percentile", "mse", "best"],
                   default=CalibrationConfig().use,
                   help="auto (default): per tensor, the candidate range (entropy/minmax/percentile/mse) with the least "
                        "effect on the output, checked against each single method on the whole INT8 model; "
                        "entropy: TensorRT's scales, exactly")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--fp16", action="store_true", help="write the FP16 model instead (no data needed)")
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales instead of per-channel")
    q.add_argument("--weight-rounding", choices=["nearest", "gptq"],
                   help="gptq: fit the int8 weight codes to each layer's calibration inputs (slower); default: "
                        "build.quantize.weight_rounding's default")
    q.add_argument("--no-shift", action="store_true",
                   help="quantize post-ReLU activations symmetrically about 0 (default: around mid-range, see README)")
    q.add_argument("--split-activations", choices=["auto", "off"],
                   help="auto: an activation whose int8 rounding dominates the output error is quantized in pieces "
                        "where that measurably helps (README); default: build.quantize.split_activations' default")
    _add_data_options(q)
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
    r.set_defaults(func=cmd_run)
    _add_calibrate(sub, common)
    _add_quantize(sub, common)

    for name, helptext in (("build", "calibrate (or reuse) and build every variant"),
                           ("evaluate", "... and evaluate every variant into a new run directory")):
        s = sub.add_parser(name, parents=[common], help=helptext)
        _with_config(s)
        s.add_argument("--run-id", help="run directory name (evaluate)")
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

    d = sub.add_parser("doctor", parents=[common], help="what this machine can run, and how to install what is missing")
    d.set_defaults(func=cmd_doctor)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    err = _console(stderr=True)
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
