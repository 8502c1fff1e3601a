"""The commands that read or rewrite one model file: `quantpipe inspect` and `quantpipe prepare` (cli.py parses
their arguments and maps their errors to exit codes)."""

from __future__ import annotations

import argparse

from quantpipe.console import console
from quantpipe.errors import EXIT_OK

__all__ = ["cmd_inspect", "cmd_prepare"]


def cmd_inspect(args: argparse.Namespace) -> int:
    """Describe any valid ONNX model: the FP32 export, or the FP16 / INT8 (Q/DQ) model you ship."""
    from rich.markup import escape
    from rich.table import Table

    from quantpipe.collapse import SUBGRAPH_OPS
    from quantpipe.model import read_model_spec
    from quantpipe.modelinfo import PRECISIONS, describe_precision, precision_lines
    from quantpipe.onnxgraph import RECURRENT_OPS

    spec, proto = read_model_spec(args.model)
    info = describe_precision(proto)
    out = console()
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
    columns = [p for p in PRECISIONS if info.totals.get(p)]
    ops = Table("op", "count", *columns, title="operators, by compute precision", title_justify="left")
    for col in ops.columns[1:]:
        col.justify = "right"
    for op, per in info.by_op.items():
        ops.add_row(op, str(spec.op_counts.get(op, sum(per.values()))), *[str(per.get(c) or "·") for c in columns])
    for op in (op for op in spec.op_counts if op not in info.by_op):  # Q/DQ, Cast: they convert, not compute
        ops.add_row(f"[dim]{op}[/dim]", str(spec.op_counts[op]), *["[dim]converts[/dim]", *[""] * (len(columns) - 1)][:len(columns)])
    out.print(ops)
    inside = [(op, n) for op, n in spec.subgraph_op_counts.items() if op not in ("Constant", "Identity")]
    if inside:
        from quantpipe.quantize.placement import QUANTIZABLE_OPS  # only here: the quantize package is heavy to import

        holders = ", ".join(f"{n} {op}" for op, n in spec.op_counts.items() if op in SUBGRAPH_OPS)
        inside.sort(key=lambda kv: kv[0] not in QUANTIZABLE_OPS and kv[0] not in RECURRENT_OPS)
        out.print(escape(f"inside the subgraphs of {holders or 'its nodes'} (every branch and body; not in the table "
                         f"above, and left in float by quantpipe): " + ", ".join(f"{op} {n}" for op, n in inside[:12])
                         + (", ..." if len(inside) > 12 else "") + "; `quantpipe prepare` folds an If its fixed inputs decide"))
    for line in precision_lines(info):
        out.print(escape(line))
    return EXIT_OK


def cmd_prepare(args: argparse.Namespace) -> int:
    """Bake fixed inputs in, fold the `If`s they decide, sort the nodes (`quantpipe.prepare`)."""
    from quantpipe.prepare import parse_axes, parse_fixed, prepare_model

    done = prepare_model(args.model, args.out, parse_fixed(args.fix), args.data, parse_axes(args.batch_axis),
                         parse_fixed(args.shape), to_fp32=args.to_fp32)
    for line in done.lines():
        console().print(line, markup=False)
    console().print(f"wrote {args.out}", markup=False)
    return EXIT_OK
