"""junit.xml: valid against the JUnit schema CI tools read; a failed rule is a <failure>, a skipped variant <skipped>."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from quantpipe.artifacts import RunResults
from quantpipe.config import GateRule
from quantpipe.gate import evaluate_gate
from quantpipe.report.junit import junit_xml
from tests.report_data import synthetic_results

XSD = Path(__file__).resolve().parents[1] / "data" / "junit.xsd"
RULES = [
    GateRule(variant="ort-int8", metric="top1_drop", max=0.01),
    GateRule(variant="ort-int8", metric="speedup", vs="ort-fp32", min=100),
    GateRule(variant="trt-int8", metric="speedup", min=1.5),
    GateRule(variant="ort-int8", metric="top1_agreement", min=0.98, name='agreement <"high"> & steady'),
]


@pytest.fixture(scope="module")
def judged() -> RunResults:
    results = synthetic_results()
    return dataclasses.replace(results, gate=evaluate_gate(results, RULES))


@pytest.fixture(scope="module")
def root(judged: RunResults) -> ET.Element:
    return ET.fromstring(junit_xml(judged).encode("utf-8"))


def _schema():  # noqa: ANN202 - lxml type
    etree = pytest.importorskip("lxml.etree", reason="lxml (quantpipe[dev]) validates junit.xml against tests/data/junit.xsd")
    return etree, etree.XMLSchema(etree.parse(str(XSD)))


def test_junit_validates_against_the_schema(judged: RunResults) -> None:
    etree, schema = _schema()
    doc = etree.fromstring(junit_xml(judged).encode("utf-8"))
    assert schema.validate(doc), schema.error_log


def test_junit_without_a_gate_verdict_validates_too(judged: RunResults) -> None:
    etree, schema = _schema()
    doc = etree.fromstring(junit_xml(dataclasses.replace(judged, gate=None)).encode("utf-8"))
    assert schema.validate(doc), schema.error_log


def test_schema_rejects_what_ci_tools_reject(judged: RunResults) -> None:
    """The schema check can fail: a test case without classname, or a bad count, is invalid."""
    etree, schema = _schema()
    doc = etree.fromstring(junit_xml(judged).encode("utf-8"))
    doc.find(".//testcase").attrib.pop("classname")
    assert not schema.validate(doc)
    doc = etree.fromstring(junit_xml(judged).encode("utf-8"))
    doc.find("testsuite").set("failures", "-1")
    assert not schema.validate(doc)


def test_one_testcase_per_rule_and_failures_carry_the_message(root: ET.Element, judged: RunResults) -> None:
    gate = root.find("testsuite[@name='quantpipe.gate']")
    assert gate is not None
    cases = gate.findall("testcase")
    assert [c.get("name") for c in cases] == [o.rule for o in judged.gate.outcomes]
    for case, outcome in zip(cases, judged.gate.outcomes, strict=True):
        failure = case.find("failure")
        assert (failure is None) == outcome.passed
        assert case.get("classname") == f"quantpipe.gate.{outcome.variant}"
        float(case.get("time"))
        if failure is not None:
            assert failure.get("message") == outcome.message
            assert outcome.message in (failure.text or "")
    speed = cases[1].find("failure")
    assert speed is not None and "ort-int8 speedup vs ort-fp32 @bs32" in speed.get("message") and ">= 100x" in speed.get("message")


def test_skipped_variants_are_skipped_testcases_with_the_reason(root: ET.Element) -> None:
    variants = root.find("testsuite[@name='quantpipe.variants']")
    assert variants is not None
    skipped = {c.get("name"): c.find("skipped") for c in variants.findall("testcase")}
    assert set(skipped) == {"ort-fp32", "ort-fp16", "ort-int8", "trt-fp32", "trt-fp16", "trt-int8"}
    assert all(skipped[n] is None for n in ("ort-fp32", "ort-fp16", "ort-int8"))
    assert "tensorrt: not installed" in skipped["trt-int8"].get("message")


def test_counts_match_the_testcases(root: ET.Element) -> None:
    total = fails = 0
    for suite in root.findall("testsuite"):
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases)
        assert int(suite.get("skipped")) == sum(c.find("skipped") is not None for c in cases)
        assert suite.get("errors") == "0" and float(suite.get("time")) >= 0
        total, fails = total + len(cases), fails + int(suite.get("failures"))
    assert int(root.get("tests")) == total == 4 + 6
    assert int(root.get("failures")) == fails == 2


def test_special_characters_survive(root: ET.Element) -> None:
    names = [c.get("name") for c in root.iter("testcase")]
    assert 'agreement <"high"> & steady' in names


def test_missing_gate_is_a_skipped_case(judged: RunResults) -> None:
    root = ET.fromstring(junit_xml(dataclasses.replace(judged, gate=None)))
    case = root.find("testsuite[@name='quantpipe.gate']/testcase")
    assert case is not None and case.find("skipped") is not None


def test_timestamp_is_utc_without_zone(root: ET.Element) -> None:
    assert {s.get("timestamp") for s in root.findall("testsuite")} == {"2025-01-01T12:00:00"}
