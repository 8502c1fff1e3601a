"""What the terminal shows: rich consoles, the progress bars of a run, the variants table and the gate's verdict.

The CLI (quantpipe/cli.py) draws through these; nothing else prints.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["console", "RichProgress", "print_summary", "collapse_lines", "gate_line", "remaining_seconds",
           "remaining_text"]


#: In a log (no terminal), a task that advances says how far it got about this often.
LOG_PROGRESS_SECONDS = 30.0


#: The width a log (no terminal, no COLUMNS) is drawn at: rich's 80 columns cut the variants table's names to
#: "ort-fp…" in a CI log, FP32 and FP16 alike (found probing).
LOG_WIDTH = 160


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    c = Console(stderr=stderr, highlight=False, soft_wrap=False)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(stderr=stderr, highlight=False, soft_wrap=False, width=LOG_WIDTH)
    return c


class RichProgress:
    """quantpipe.pipeline.Progress drawn with rich (transient bars on stderr, one line per finished task)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.err = console(stderr=True)

    def _logged(self, description: str, total: int | None, start: float) -> Callable[[int], None]:
        """A task's advance callback for a log: a line every LOG_PROGRESS_SECONDS with the count so far (a long
        stage in CI said nothing until it ended: ViT-S's latency and sensitivity ran 170 s unannounced)."""
        import time

        done, said = [0], [start]

        def advance(n: int) -> None:
            done[0] += n
            now = time.perf_counter()
            if now - said[0] >= LOG_PROGRESS_SECONDS:
                said[0] = now
                of = f" of {total}" if total else ""
                left = f", {remaining_text(done[0], total, now - start)}" if total else ""
                self.err.print(f"[dim]…[/dim] {description}: {done[0]}{of} [dim]({now - start:.0f} s{left})[/dim]")

        return advance

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        import time

        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        start = time.perf_counter()
        if not self.enabled:  # -q: warnings and results only
            yield lambda n: None
            return
        if not self.err.is_terminal:  # a CI log: no bars, one line per finished task, and a line on a long one
            yield self._logged(description, total, start)
            self.err.print(f"[dim]•[/dim] {description} [dim]({time.perf_counter() - start:.1f} s)[/dim]")
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        if total:  # a count that is known also says about how long is left
            columns.append(TimeRemainingColumn())
        with Progress(*columns, console=self.err, transient=True) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda n: bar.advance(tid, n)
        self.err.print(f"[green]✓[/green] {description} [dim]({time.perf_counter() - start:.1f} s)[/dim]")


def remaining_seconds(done: int, total: int, elapsed: float) -> float | None:
    """The seconds a long count has left at the mean rate so far; None before the first item is done."""
    return elapsed / done * max(total - done, 0) if done > 0 else None


def remaining_text(done: int, total: int, elapsed: float) -> str:
    """'about N s left' (or min) at the mean rate so far, for a log line of a long count; 'no estimate yet' before
    the first item is done. Items can differ in cost (an early layer's part is most of the model), so it is said
    as an estimate."""
    left = remaining_seconds(done, total, elapsed)
    if left is None:
        return "no estimate yet"
    return f"about {left / 60:.0f} min left" if left >= 120 else f"about {left:.0f} s left"


_HOOK_COLUMNS = 2
"""The most metrics of evaluate.metrics hooks shown as columns of the variants' table (`print_summary`)."""


def _hook_table(results: Any, metrics: Sequence[str]) -> Any:
    """The hooks' metrics, one row each, a column per variant that ran."""
    from rich.table import Table

    ran = [e for e in results.evaluations if not e.skipped]
    table = Table("your metrics (evaluate.metrics hooks)", title_justify="left")
    for e in ran:
        table.add_column(e.variant, justify="right", no_wrap=True)
    for m in metrics:
        table.add_row(m, *[_fmt(m, e.metrics.get(m)) for e in ran])
    return table


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "—"
    if metric in ("top1", "top5", "top1_agreement", "top1_drop", "top5_drop", "line_agreement", "line_accuracy", "cer",
                  "label_cer"):
        return f"{100 * v:.2f}%"
    if metric in ("cosine", "map_iou", "map_iou_min", "box_agreement", "pixel_agreement", "miou", "detection_agreement",
                  "rank_correlation"):
        return f"{v:.4f}"
    if metric.endswith("sqnr_db"):  # sqnr_db, centered_sqnr_db, other_outputs_sqnr_db
        return f"{v:.1f}dB"
    return f"{v:.4g}"


def print_summary(results: Any) -> None:
    """Variants table and the gate verdict, on stdout."""
    from rich.markup import escape
    from rich.table import Table

    out = console()
    for line in collapse_lines(results):
        out.print(line)
    table = Table(title=f"quantpipe · {Path(results.model.path).name} · run {results.run_id}", title_justify="left")
    cols = {"top1": "top1", "top1_agreement": "agree", "cosine": "cosine", "sqnr_db": "SQNR"}
    # The task's own metrics (CTC lines, dense maps) where measured; top-1 columns only where a variant has them.
    task_cols = {"line_accuracy": "line acc", "line_agreement": "line agree", "cer": "CER", "map_iou": "IoU",
                 "map_iou_min": "IoU min",
                 "box_agreement": "box agree", "pixel_agreement": "pixel agree", "miou": "mIoU",
                 "detection_agreement": "det agree", "mae": "MAE", "centered_sqnr_db": "SQNR vs spread",
                 "rank_correlation": "rank corr", "label_mae": "MAE vs labels"}
    measured = {m for e in results.evaluations if not e.skipped for m, val in e.metrics.items() if val is not None}
    if measured & set(task_cols):
        cols = {**{m: h for m, h in cols.items() if m in measured and m != "sqnr_db"},
                **{m: h for m, h in task_cols.items() if m in measured}, "sqnr_db": "SQNR"}
    from quantpipe.gate import hook_metrics
    from quantpipe.other_outputs import OTHER_KEY

    own = [m for m in hook_metrics(results) if m in measured]  # what evaluate.metrics hooks returned
    # More than two hooks' metrics get a table of their own, one row each: as columns their names were cut to
    # "grid_p…", "grid_…", "unwar…" and nothing told them apart (found probing).
    apart = own if len(own) > _HOOK_COLUMNS else []
    cols.update({m: m for m in own if m not in apart})
    if OTHER_KEY in measured:
        cols[OTHER_KEY] = "others"  # the lowest SQNR of the outputs besides model.output
    table.add_column("variant", no_wrap=True)
    table.add_column("dev", no_wrap=True)
    for head in cols.values():
        table.add_column(head, justify="right", no_wrap=head not in own)  # a hook's long name wraps, not the numbers
    bs_all = sorted({lat.batch_size for e in results.evaluations for lat in e.latency})
    for bs in bs_all:
        table.add_column(f"ms@{bs}", justify="right", no_wrap=True)
    table.add_column("MB", justify="right", no_wrap=True, min_width=6)
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
    if apart:
        out.print(_hook_table(results, apart))
    for reason, names in skipped.items():
        out.print(f"  [yellow]skipped[/yellow] {escape(', '.join(names))}: {escape(reason)}")
    if results.gate is not None:
        for o in results.gate.outcomes:
            mark = "[green]PASS[/green]" if o.passed else "[red]FAIL[/red]"
            out.print(f"  {mark} {escape(o.message)}")
        out.print(gate_line(results.gate))


def collapse_lines(results: Any) -> list[str]:
    """Rich-markup lines for each collapsed INT8 (or unmeasured FP16) variant (printed first): what, likely cause, the YAML to paste."""
    from rich.markup import escape

    lines = []
    for c in getattr(results, "collapse", ()):
        word = getattr(c, "precision", "int8").upper()
        head = {"collapsed": f"[bold red]{word} COLLAPSED", "degraded": f"[bold yellow]{word} DEGRADED"}.get(
            c.severity, f"[bold yellow]{word} NOT MEASURED")
        lines.append(f"{head}: {escape(c.variant)}[/]: {escape('; '.join(c.problems))}.")
        lines.append(f"  likely cause: {escape(c.cause)}")
        lines.append(f"  fix: {escape(c.fix)}")
        lines += [f"    {escape(line)}" for line in c.fix_yaml.splitlines()]
    return lines


def gate_line(gate: Any) -> str:
    """The verdict line: how many rules failed (or that all passed), in the words of the report's verdict."""
    n = len(gate.outcomes)
    failed = sum(not o.passed for o in gate.outcomes)
    rules = f"rule{'s' if n != 1 else ''}"
    if not gate.passed:
        return f"[bold red]gate FAILED[/bold red] ({failed} of {n} {rules} failed)" if failed else \
            "[bold red]gate FAILED[/bold red]"
    return f"[bold green]gate passed[/bold green] (all {n} {rules} passed)" if n else \
        "[bold green]gate passed[/bold green] (no rules)"
