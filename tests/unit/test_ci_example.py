"""examples/ci/github-actions.yml is a valid workflow that installs, runs, gates and publishes like the README."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "examples" / "ci" / "github-actions.yml"
README = ROOT / "README.md"
DOCS = ROOT / "docs" / "ci.md"


@pytest.fixture(scope="module")
def workflow() -> dict[Any, Any]:
    doc = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def steps(workflow: dict[Any, Any]) -> list[dict[str, Any]]:
    jobs = workflow["jobs"]
    assert len(jobs) == 1
    (job,) = jobs.values()
    assert job["runs-on"] == "ubuntu-latest"
    return job["steps"]


def _run_steps(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in steps if "run" in s]


def _index(steps: list[dict[str, Any]], pred: Any) -> int:
    found = [i for i, s in enumerate(steps) if pred(s)]
    assert found, "no such step"
    return found[0]


def test_workflow_structure(workflow: dict[Any, Any], steps: list[dict[str, Any]]) -> None:
    # PyYAML reads the bare key `on` as the boolean True (YAML 1.1); GitHub reads it as the string.
    triggers = workflow.get("on", workflow.get(True))
    assert {"push", "pull_request"} <= set(triggers)
    assert workflow["permissions"]["checks"] == "write"  # needed to publish the JUnit check run
    for step in steps:
        assert ("uses" in step) != ("run" in step), f"a step needs exactly one of uses/run: {step}"
        if "uses" in step:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), step["uses"]


def test_checkout_setup_python_and_install(steps: list[dict[str, Any]]) -> None:
    checkout = _index(steps, lambda s: s.get("uses", "").startswith("actions/checkout@"))
    setup = _index(steps, lambda s: s.get("uses", "").startswith("actions/setup-python@"))
    install = _index(steps, lambda s: re.search(r"\bpip install \.(\s|$)", s.get("run", "")) is not None)
    assert checkout < setup < install
    assert str(steps[setup]["with"]["python-version"]) in {"3.10", "3.11", "3.12"}


def test_runs_the_pipeline_and_propagates_its_exit_code(steps: list[dict[str, Any]]) -> None:
    run = _index(steps, lambda s: "quantpipe run pipeline.yaml" in s.get("run", ""))
    install = _index(steps, lambda s: "pip install ." in s.get("run", ""))
    assert install < run
    step = steps[run]
    assert not step.get("continue-on-error"), "the gate's exit code must fail the job"
    assert "if" not in step
    assert "|| true" not in step["run"] and "set +e" not in step["run"]
    # quantpipe appends summary.md to $GITHUB_STEP_SUMMARY itself: the step must not hide that file.
    assert "GITHUB_STEP_SUMMARY" not in step.get("env", {})


def test_uses_the_same_command_as_the_readme(steps: list[dict[str, Any]]) -> None:
    if not README.is_file():
        pytest.skip("README.md is not written yet")
    readme = README.read_text(encoding="utf-8")
    commands = [s["run"].strip() for s in _run_steps(steps) if re.search(r"^\s*quantpipe ", s["run"], re.M)]
    assert commands == ["quantpipe run pipeline.yaml"]
    assert "quantpipe run pipeline.yaml" in readme, "the README's command and the workflow's differ"


def test_publishes_summary_report_and_junit_even_when_the_gate_fails(steps: list[dict[str, Any]]) -> None:
    run = _index(steps, lambda s: "quantpipe run pipeline.yaml" in s.get("run", ""))
    later = steps[run + 1:]
    summary = [s for s in later if "GITHUB_STEP_SUMMARY" in s.get("run", "")]
    assert summary and all("always()" in s["if"] for s in summary)
    upload = [s for s in later if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert len(upload) == 1 and upload[0]["if"] == "always()" and "reports/latest" in upload[0]["with"]["path"]
    junit = [s for s in later if s.get("uses", "").split("@")[0] in ("mikepenz/action-junit-report", "dorny/test-reporter")]
    assert len(junit) == 1 and junit[0]["if"] == "always()"
    paths = junit[0]["with"].get("report_paths") or junit[0]["with"].get("path")
    assert paths == "reports/latest/junit.xml"
    # Publishing must not turn a gate failure into a pass, nor fail twice.
    assert str(junit[0]["with"].get("fail_on_failure", "false")).lower() == "false"


def test_docs_document_exit_codes_and_gitlab() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for code, meaning in ((0, "passed"), (1, "gate failed"), (2, "bad input"), (3, "dependency"), (4, "stage failed"),
                          (130, "interrupted")):
        assert re.search(rf"\|\s*{code}\s*\|[^\n]*{meaning}", text), f"exit code {code} ({meaning}) not documented"
    gitlab = text[text.index("## GitLab CI"):]
    snippet = yaml.safe_load(gitlab.split("```yaml", 1)[1].split("```", 1)[0])
    job = snippet["quantpipe"]
    assert "quantpipe run pipeline.yaml" in job["script"] and "pip install ." in job["script"]
    assert job["artifacts"]["when"] == "always" and job["artifacts"]["reports"]["junit"].endswith("junit.xml")
