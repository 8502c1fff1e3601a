"""CI glue: the job summary for GitHub Actions and `::error::` annotations for failed gate rules.

The library never prints: `publish_ci` appends the markdown summary to the file named by
$GITHUB_STEP_SUMMARY (when set) and returns the workflow-command lines for the CLI to print on stdout
(only under GitHub Actions, where GITHUB_ACTIONS=true; elsewhere they would be noise).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from quantpipe.artifacts import RunResults
from quantpipe.report.rundir import in_run

__all__ = ["step_summary", "github_annotations", "publish_ci"]

log = logging.getLogger(__name__)


def _escape_data(text: str) -> str:
    # GitHub workflow commands: %, CR and LF must be percent-encoded in the message.
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def step_summary(results: RunResults, run_dir: str | os.PathLike[str] | None = None) -> str:
    """The markdown summary of a judged run (what summary.md holds)."""
    from quantpipe.report.render import render_summary, summary_context

    context = summary_context(results)
    context["run_dir"] = str(run_dir) if run_dir is not None else None
    return render_summary(context)


def _config_file(results: RunResults, env: Mapping[str, str], run_dir: str | os.PathLike[str] | None) -> str | None:
    """pipeline.yaml relative to the checkout, so GitHub attaches the annotation to that file (results.json records
    it relative to the run folder)."""
    if not results.config_path:
        return None
    workspace = Path(env.get("GITHUB_WORKSPACE") or os.getcwd())
    config = in_run(results.config_path, run_dir) if run_dir is not None else Path(results.config_path)
    try:
        return config.resolve().relative_to(workspace.resolve()).as_posix()
    except ValueError:
        return None


def github_annotations(results: RunResults, env: Mapping[str, str] | None = None,
                       run_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """`::error::` per failed rule, `::warning::` per skipped variant and baseline regression, `::notice::` on pass."""
    env = os.environ if env is None else env
    where = _config_file(results, env, run_dir)
    file_prop = f"file={_escape_property(where)}," if where else ""
    lines = []
    if results.gate is not None:
        failed = [o for o in results.gate.outcomes if not o.passed]
        for o in failed:
            lines.append(f"::error {file_prop}title={_escape_property(f'quantpipe gate: {o.rule}')}::{_escape_data(o.message)}")
        if not failed:
            n = len(results.gate.outcomes)
            lines.append(f"::notice title=quantpipe gate passed::{n} rule{'s' if n != 1 else ''} passed in run "
                         f"{_escape_data(results.run_id)}")
    skipped: dict[str, list[str]] = {}
    for v in results.variants:
        if v.skipped:
            skipped.setdefault(v.skipped, []).append(v.name)
    for reason, names in skipped.items():  # one warning per reason, naming every variant it skipped
        title = f"quantpipe: {', '.join(names)} skipped"
        lines.append(f"::warning title={_escape_property(title)}::{_escape_data(reason)}")
    for text in (results.baseline or {}).get("regressions", []):
        lines.append(f"::warning title=quantpipe: regression vs baseline::{_escape_data(str(text))}")
    return lines


def publish_ci(results: RunResults, run_dir: str | os.PathLike[str] | None = None,
               env: Mapping[str, str] | None = None) -> list[str]:
    """Append the summary to $GITHUB_STEP_SUMMARY (if set); return annotation lines to print (if on GitHub Actions).

    Outside GitHub Actions this writes nothing and returns [].
    """
    env = os.environ if env is None else env
    summary_file = env.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        text = step_summary(results, run_dir)
        try:
            with open(summary_file, "a", encoding="utf-8") as fh:
                fh.write(text if text.endswith("\n") else text + "\n")
        except OSError as err:  # a broken summary file must not turn a gate verdict into a crash
            log.warning("cannot append the job summary to %s: %s", summary_file, err)
    if env.get("GITHUB_ACTIONS") != "true":
        return []
    return github_annotations(results, env, run_dir)
