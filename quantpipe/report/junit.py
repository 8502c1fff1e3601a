"""junit.xml: the gate in the format every CI system already displays.

Layout (the Ant/Jenkins "JUnit 10" dialect that GitHub test reporters, GitLab, Jenkins and Azure read):
one <testsuites> holding two <testsuite>s —
  * "quantpipe.gate": one <testcase> per gate rule; a failed rule carries <failure message="...">
    with the rule's message (variant, metric, observed, allowed);
  * "quantpipe.variants": one <testcase> per variant; a variant that did not run carries <skipped
    message="why">, so a TensorRT build skipped on a machine without TensorRT is visible, not silent.
Gate rules take no measurable time of their own, so their time is 0.
"""

from __future__ import annotations

import datetime as _dt
import xml.etree.ElementTree as ET

from quantpipe.artifacts import RunResults

__all__ = ["junit_xml"]


def _timestamp(created: str) -> str:
    """ISO 8601 without a zone (the JUnit schema's pattern has none), in UTC."""
    try:
        when = _dt.datetime.fromisoformat(created)
    except ValueError:
        return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if when.tzinfo is not None:
        when = when.astimezone(_dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S")


def _suite(parent: ET.Element, name: str, idx: int, results: RunResults) -> ET.Element:
    suite = ET.SubElement(parent, "testsuite", {
        "name": name, "id": str(idx), "package": "quantpipe", "timestamp": _timestamp(results.created),
        "hostname": "localhost", "tests": "0", "failures": "0", "errors": "0", "skipped": "0", "time": "0",
    })
    props = ET.SubElement(suite, "properties")
    for key, value in (("run_id", results.run_id), ("model", results.model.path), ("reference", results.reference),
                       ("quantpipe", results.tool_version)):
        ET.SubElement(props, "property", {"name": key, "value": str(value)})
    return suite


def _count(suite: ET.Element) -> tuple[int, int, int]:
    cases = suite.findall("testcase")
    failures = sum(1 for c in cases if c.find("failure") is not None)
    skipped = sum(1 for c in cases if c.find("skipped") is not None)
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(failures))
    suite.set("skipped", str(skipped))
    return len(cases), failures, skipped


def junit_xml(results: RunResults) -> str:
    """The junit.xml text for a judged run (results.gate may be None: the gate suite then says so)."""
    root = ET.Element("testsuites", {"name": f"quantpipe {results.run_id}"})
    gate = _suite(root, "quantpipe.gate", 0, results)
    if results.gate is None:
        case = ET.SubElement(gate, "testcase", {"name": "gate", "classname": "quantpipe.gate", "time": "0"})
        ET.SubElement(case, "skipped", {"message": "the gate was not evaluated for this run (run `quantpipe gate`)"})
    else:
        for o in results.gate.outcomes:
            case = ET.SubElement(gate, "testcase", {"name": o.rule, "classname": f"quantpipe.gate.{o.variant}",
                                                    "time": "0"})
            if not o.passed:
                failure = ET.SubElement(case, "failure", {"message": o.message, "type": "GateRuleFailed"})
                observed = "n/a" if o.observed is None else repr(o.observed)
                failure.text = f"{o.message}\nrule: {o.rule}\nobserved (raw): {observed}\nallowed: {o.allowed}\n"
            else:
                out = ET.SubElement(case, "system-out")
                out.text = o.message
    variants = _suite(root, "quantpipe.variants", 1, results)
    evaluated = {e.variant: e for e in results.evaluations}
    for v in results.variants:
        case = ET.SubElement(variants, "testcase", {"name": v.name, "classname": f"quantpipe.variants.{v.backend}",
                                                    "time": "0"})
        e = evaluated.get(v.name)
        reason = v.skipped or (e.skipped if e is not None else "not evaluated in this run")
        if reason:
            ET.SubElement(case, "skipped", {"message": reason})
    totals = [_count(s) for s in (gate, variants)]
    root.set("tests", str(sum(t[0] for t in totals)))
    root.set("failures", str(sum(t[1] for t in totals)))
    root.set("errors", "0")
    # No `skipped` on <testsuites>: the JUnit 10 schema does not allow it there (each suite carries its own).
    root.set("time", "0")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
