"""The report stage: a run's results as files people and CI read.

    write_report(run_dir, results, formats=..., baseline=...)  report.html/.md, results.json/.csv, junit.xml, summary.md
    update_latest(report_root, run_dir)                          reports/latest -> the newest run
    load_results(run_dir)                                        results.json, validated (DataError otherwise)
    publish_ci(results, run_dir)                                 GitHub job summary + ::error:: lines to print
    with_baseline(results, baseline)                             results carrying the comparison with a baseline run

Tables come from pandas (tables.py), plots from matplotlib (plots.py, imported only when drawing),
pages from jinja2 templates (templates/).
"""

from __future__ import annotations

from quantpipe.report.ci import github_annotations, publish_ci, step_summary
from quantpipe.report.compare import compare_runs, with_baseline
from quantpipe.report.junit import junit_xml
from quantpipe.report.render import FORMATS, OUTPUT_FILES, build_context, render_html, render_markdown, write_report
from quantpipe.report.rundir import load_results, resolve_latest, update_latest

__all__ = [
    "FORMATS",
    "OUTPUT_FILES",
    "write_report",
    "build_context",
    "render_html",
    "render_markdown",
    "load_results",
    "update_latest",
    "resolve_latest",
    "compare_runs",
    "with_baseline",
    "junit_xml",
    "publish_ci",
    "step_summary",
    "github_annotations",
]
