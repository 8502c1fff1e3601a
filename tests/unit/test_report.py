"""The report files of a run: what they hold, that they are self-contained and reproducible, and CI glue."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from quantpipe.artifacts import RunResults, Variant
from quantpipe.config import GateRule
from quantpipe.errors import ConfigError, DataError
from quantpipe.gate import evaluate_gate
from quantpipe.report import load_results, publish_ci, resolve_latest, update_latest, write_report
from quantpipe.report.render import build_context, render_html, render_markdown
from quantpipe.report.rundir import write_complete
from tests.report_data import synthetic_results, with_top1

RULES = [
    GateRule(variant="ort-int8", metric="top1_drop", max=0.01),
    GateRule(variant="ort-int8", metric="speedup", vs="ort-fp32", min=100),
    GateRule(variant="trt-int8", metric="speedup", min=1.5),
    GateRule(variant="ort-int8", metric="top1", baseline=True, min=-0.002),
]


def judged(run: Path | None, baseline: RunResults | None = None, **kw) -> RunResults:  # noqa: ANN003
    results = synthetic_results(run, **kw)
    return dataclasses.replace(results, gate=evaluate_gate(results, RULES, baseline))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], RunResults]:
    root = tmp_path_factory.mktemp("reports")
    baseline = synthetic_results(root / "base", run_id="release-1", int8_top1=0.98, seed=3)
    run = root / "20250101T120000Z"
    results = judged(run, baseline)
    started = time.perf_counter()
    paths = write_report(run, results, baseline=baseline)
    elapsed = time.perf_counter() - started
    # Generous: the report of this example renders in about 1-2 s on 2 cores; this catches a pathological slowdown.
    assert elapsed < 20, f"write_report took {elapsed:.1f} s"
    return run, paths, results


def test_every_format_is_written(written: tuple[Path, dict[str, Path], RunResults]) -> None:
    run, paths, _ = written
    assert set(paths) == {"md", "html", "json", "csv", "junit", "summary"}
    assert {p.name for p in paths.values()} == {"report.md", "report.html", "results.json", "results.csv", "junit.xml",
                                                 "summary.md"}
    assert all(p.parent == run and p.stat().st_size > 200 for p in paths.values())
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files


def test_results_json_round_trips_with_gate_and_baseline(written: tuple[Path, dict[str, Path], RunResults]) -> None:
    run, _, results = written
    loaded = load_results(run)
    assert loaded.schema_version == 1 and loaded.run_id == results.run_id
    assert loaded.gate == results.gate
    assert loaded.baseline is not None and loaded.baseline["run_id"] == "release-1"
    assert loaded.baseline["regressions"] == ["ort-int8 top1: 98.00% -> 97.33% (-0.67 pt)"]
    json.loads((run / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))


def test_csv_is_one_row_per_variant_and_batch_size(written: tuple[Path, dict[str, Path], RunResults]) -> None:
    run, _, _ = written
    df = pd.read_csv(run / "results.csv")
    ran = df[df["status"] != "skipped"]
    assert sorted(zip(ran["variant"], ran["batch_size"].astype(int), strict=True)) == sorted(
        (v, bs) for v in ("ort-fp32", "ort-fp16", "ort-int8") for bs in (1, 32))
    skipped = df[df["status"] == "skipped"]
    assert list(skipped["variant"]) == ["trt-fp32", "trt-fp16", "trt-int8"] and skipped["batch_size"].isna().all()
    assert skipped["skipped_reason"].str.contains("tensorrt: not installed").all()
    pivot = ran.pivot(index="variant", columns="batch_size", values="latency_median_ms")
    assert pivot.shape == (3, 2)
    assert ran.loc[ran["variant"] == "ort-fp32", "speedup"].tolist() == [1.0, 1.0]
    assert ran.loc[ran["variant"] == "ort-int8", "top1"].tolist() == [0.9733, 0.9733]


def test_html_is_self_contained(written: tuple[Path, dict[str, Path], RunResults]) -> None:
    html = written[1]["html"].read_text()
    assert "<script" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "report.html must not load anything"
    assert "@import" not in html
    assert re.findall(r"url\((?!#)", html) == []  # only in-page references (SVG clip paths)
    assert html.count("<svg") == 4 and "@media print" in html


def test_html_shows_verdict_rules_and_skipped_variants(written: tuple[Path, dict[str, Path], RunResults]) -> None:
    html = written[1]["html"].read_text()
    assert "Gate FAILED: 3 of 4 rules failed" in html
    assert "ort-int8 speedup vs ort-fp32 @bs32 = " in html and "allowed &gt;= 100x: FAILED" in html
    assert html.count('class="badge skip"') == 3 and "tensorrt: not installed" in html
    for section in ("verdict", "variants", "baseline", "tradeoff", "latency", "sensitivity", "histograms", "calibration",
                    "environment"):
        assert f'<section id="{section}">' in html


def test_environment_shows_no_python_repr(written: tuple[Path, dict[str, Path], RunResults]) -> None:
    html = written[1]["html"].read_text()
    section = html[html.index('<section id="environment">'):]
    section = section[:section.index("</section>")]
    assert "{'" not in section and "['" not in section and "&#39;available" not in section
    assert "<dt>onnxruntime CUDA</dt><dd>not available: no NVIDIA GPU, so no onnxruntime CUDA execution provider</dd>" \
        in section
    md = written[1]["md"].read_text()
    assert "{'" not in md[md.index("## Environment"):]


def test_environment_rows_of_unknown_nested_keys() -> None:
    from quantpipe.report.tables import environment_rows

    rows = dict(environment_rows({"accelerator": {"name": "X1", "cores": [4, 8], "note": None},
                                  "probe": {"available": True, "version": "2.0"}, "flags": ["a", "b"]}))
    assert rows == {"accelerator": "name: X1; cores: 4, 8", "probe": "2.0", "flags": "a, b"}


def _svg_texts(svg: str) -> list[str]:
    return [t.strip() for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg)]


def test_the_runs_warnings_reach_the_report_and_the_summary(tmp_path: Path) -> None:
    # basic-pitch (found probing): FP32's note map held no box of min_box_side, so box_agreement was 1.0 for every
    # variant; the log said so, and summary.md showed 1.0000 as the headline with no word of it.
    import logging

    from quantpipe.runlog import MAX_WARNINGS, warnings_said

    with warnings_said() as said:
        log = logging.getLogger("quantpipe.evaluate")
        log.warning("FP32's map holds no component of at least\n evaluate.dense.min_box_side (3) pixels a side")
        log.warning("FP32's map holds no component of at least evaluate.dense.min_box_side (3) pixels a side")
        logging.getLogger("quantpipe.calibrate").info("not a warning")
        logging.getLogger("elsewhere").warning("not quantpipe's")
    logging.getLogger("quantpipe").warning("after the run")
    assert said == ["FP32's map holds no component of at least evaluate.dense.min_box_side (3) pixels a side"]
    many = tuple(f"warning {i}" for i in range(MAX_WARNINGS + 3))
    written = write_report(tmp_path / "run", dataclasses.replace(synthetic_results(tmp_path), warnings=(*said, *many)))
    for fmt in ("md", "summary", "html"):
        text = " ".join(written[fmt].read_text().split())
        assert "The run's warnings" in text and "min_box_side (3) pixels a side" in text, fmt
        assert "and 4 more in the log" in text and "warning 18" in text and "warning 19" not in text, fmt
    assert json.loads((tmp_path / "run" / "results.json").read_text())["warnings"][0].startswith("FP32's map")
    quiet = write_report(tmp_path / "quiet", synthetic_results(tmp_path))
    assert "The run's warnings" not in quiet["md"].read_text()


def test_latency_says_which_variant_ran_below_the_default_optimization_level(tmp_path: Path) -> None:
    # khmersm's FP16 crashed onnxruntime at level 'all' and was timed at 'extended': the latency table and the
    # highlights compared it with FP32 at 'all' without a word (found probing).
    from quantpipe.artifacts import ORT_OPTIMIZATION_KEY

    results = synthetic_results(None)
    variants = tuple(dataclasses.replace(v, details={ORT_OPTIMIZATION_KEY: "extended"}) if v.name == "ort-fp16" else v
                     for v in results.variants)
    md = write_report(tmp_path, dataclasses.replace(results, variants=variants))["md"].read_text()
    assert "| ort-fp16 (optimization level 'extended') |" in md
    assert "at batch size 32 (at onnxruntime's optimization level 'extended')" in md
    assert "ort-int8 (optimization level" not in md


def _hooked(results: RunResults, agree: float, cents: float) -> RunResults:
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, "pitch_agree_50c": 1.0 if e.variant == "ort-fp32" else agree,
                                                  "pitch_median_cents": 0.0 if e.variant == "ort-fp32" else cents})
                  for e in results.evaluations if e.skipped is None)
    return dataclasses.replace(results, evaluations=evals + tuple(e for e in results.evaluations if e.skipped))


def test_hook_metrics_show_in_every_table_and_the_baseline_comparison(tmp_path: Path) -> None:
    # A pitch tracker's hook metrics reached only the gate rows: no table, no results.csv column, and the baseline
    # listed 11 regressions but not the median error going from 0.23 to 3.15 cents (twelfth contact).
    from quantpipe.gate import hook_metrics
    from quantpipe.report.compare import compare_runs

    base = _hooked(synthetic_results(None), 1.0, 0.23)
    now = _hooked(synthetic_results(None, run_id="20250102T120000Z"), 0.95, 3.15)
    now = dataclasses.replace(now, gate=evaluate_gate(now, [GateRule(variant="ort-int8", metric="pitch_agree_50c",
                                                                     min=0.9)]))
    assert hook_metrics(now) == ["pitch_agree_50c", "pitch_median_cents"]
    # quantpipe's own extra keys are no hook's
    marked = dataclasses.replace(now, evaluations=tuple(dataclasses.replace(e, metrics={
        **e.metrics, "identical_to_fp32": 1.0, "channel_sqnr_min_db": 3.0}) for e in now.evaluations))
    assert hook_metrics(marked) == ["pitch_agree_50c", "pitch_median_cents"]
    files = write_report(tmp_path, now)
    md, csv = files["md"].read_text(), pd.read_csv(files["csv"])
    assert "| pitch_agree_50c | pitch_median_cents |" in md  # the variants table's header
    assert {"pitch_agree_50c", "pitch_median_cents"} <= set(csv.columns)
    assert "pitch_median_cents" in files["html"].read_text()
    deltas = {(d["variant"], d["metric"]): d for d in compare_runs(now, base)["deltas"]}
    # Bounded from below by a gate rule: higher is better, so 1.0 -> 0.95 is a regression.
    assert deltas[("ort-int8", "pitch_agree_50c")]["regressed"]
    # No rule says which way the median error reads: its change is shown, judged neither way.
    cents = deltas[("ort-int8", "pitch_median_cents")]
    assert cents["delta"] == pytest.approx(2.92) and not cents["regressed"] and not cents["improved"]


def test_int8_build_line_counts_the_layers_left_in_float() -> None:
    # "110 of 110 quantizable nodes got Q/DQ" above "Left in float: two Gemms" (found probing a CRNN): the writer's
    # float nodes were not among the "quantizable"; the line says both counts.
    quantize = {"quantized": 110, "num_quantizable": 110, "per_channel": True, "opset_before": 17, "opset_after": 17,
                "kept_float": [{"node": f"/lstm_{d}/cell/Gemm", "op_type": "Gemm", "reason": "no calibration amax"}
                               for d in ("fwd", "bwd")], "kept_float_count": 2, "shifted": 0, "bias_corrected": 0,
                "smoothed": 0, "gptq_rounded": 0, "warnings": []}
    results = synthetic_results(None)
    variants = tuple(dataclasses.replace(v, details={"quantize": quantize}) if v.name == "ort-int8" else v
                     for v in results.variants)
    lines = build_context(Path("nowhere"), dataclasses.replace(results, variants=variants), draw=False)["int8_build"]
    assert lines[0].startswith("110 node(s) got Q/DQ, 2 Conv / Gemm / MatMul node(s) stayed in float (below) (weights")
    assert lines[1].startswith("Left in float: /lstm_fwd/cell/Gemm (no calibration amax), /lstm_bwd/cell/Gemm")
    # equalized depthwise inputs were counted as SmoothQuant's alone (SLANet, found probing)
    quantize.update(smoothed=3, equalized_depthwise=True)
    lines = build_context(Path("nowhere"), dataclasses.replace(results, variants=variants), draw=False)["int8_build"]
    assert any("3 activation(s) smoothed" in ln and "depthwise Convs' inputs equalized" in ln for ln in lines)


@pytest.mark.parametrize("tie_break", [True, False])
def test_sensitivity_table_shows_what_orders_ties_and_its_samples(tie_break: bool) -> None:
    from quantpipe.artifacts import LayerSensitivity

    # Two layers tied on top-1 agreement, ordered by the output SQNR with that layer alone: the table shows it
    # (the order looked arbitrary), the samples it measured on, and which Conv is depthwise.
    sens = (LayerSensitivity("/dw/Conv", "Conv", "a", 20.0, 0.95, "top1_agreement", 11.5 if tie_break else None, 64,
                             True),
            LayerSensitivity("/pw/Conv", "Conv", "b", 30.0, 0.95, "top1_agreement", 17.25 if tie_break else None, 64),
            LayerSensitivity("/box/Gemm", "Gemm", "c", 25.0, None, "top1_agreement", None, 64, reaches_output=False))
    ctx = build_context(Path("nowhere"), dataclasses.replace(synthetic_results(None), sensitivity=sens), draw=False)
    for text in (" ".join(render_markdown(ctx).split()), " ".join(render_html(ctx).split())):
        assert "on 64 evaluation samples" in text
        assert ("Output SQNR, only this layer INT8 (orders ties)" in text) is tie_break
        assert ("11.50 dB" in text and "17.25 dB" in text) is tie_break
        assert text.count("Conv (depthwise)") == 1
        assert "/box/Gemm (not on model.output's path: not judged)" in text.replace("`", "")
    md = render_markdown(ctx)
    assert "| 1 | `/dw/Conv` | Conv (depthwise) | 95.00% |" + (" 11.50 dB |" if tie_break else "") + " 20.00 dB |" in md


@pytest.mark.parametrize("measured", [True, False])
def test_sensitivity_chart_draws_what_it_ranks_by(measured: bool) -> None:
    from quantpipe.artifacts import LayerSensitivity
    from quantpipe.gate import format_value

    # Layer SQNR and the output metric disagree on the order: the chart must follow the ranking, which is the
    # analysis's own (results.sensitivity, worst first): the report re-sorted by layer SQNR (found probing).
    rows = [("/a/Conv", 20.0, 0.999), ("/b/Conv", 35.0, 0.950), ("/c/Gemm", 30.0, 0.990)]
    order = ["/b/Conv", "/c/Gemm", "/a/Conv"] if measured else ["/a/Conv", "/c/Gemm", "/b/Conv"]
    by = {n: (sq, m) for n, sq, m in rows}
    sens = tuple(LayerSensitivity(n, n.split("/")[-1], f"{n}_out", by[n][0], by[n][1] if measured else None,
                                  "top1_agreement") for n in order)
    results = dataclasses.replace(synthetic_results(None), sensitivity=sens)
    ctx = build_context(Path("nowhere"), results)
    assert [r["node"] for r in ctx["sensitivity"]["rows"]] == order
    # A tie on the metric, broken by the analysis (output SQNR with that layer alone), stays as it broke it.
    tied = (dataclasses.replace(sens[0], node="/t1/Conv", sqnr_db=40.0), dataclasses.replace(sens[0], node="/t2/Conv",
                                                                                                sqnr_db=10.0))
    rows_shown = build_context(Path("nowhere"), dataclasses.replace(results, sensitivity=tied + sens),
                               sensitivity_rows=2)["sensitivity"]["rows"]
    assert [r["node"] for r in rows_shown] == ["/t1/Conv", "/t2/Conv"]  # and evaluate.sensitivity.top rows
    # ModelOpt's tables (details["sensitivity"]) show as many rows as the main one: they showed 12 whatever was set
    mo_rows = [{"node": f"/m{i}/Conv", "op_type": "Conv", "output_metric": 1.0, "metric_name": "top1_agreement"}
               for i in range(15)]
    mo = Variant("modelopt-int8", "modelopt", "int8", "cpu", "models/mo.onnx", details={"sensitivity": mo_rows})
    with_mo = dataclasses.replace(results, variants=(*results.variants, mo))
    for top in (3, 14):
        shown = build_context(Path("nowhere"), with_mo, draw=False, sensitivity_rows=top)["variant_sensitivity"]
        assert [(v["variant"], len(v["rows"]), v["total"]) for v in shown] == [("modelopt-int8", top, 15)]
    texts = _svg_texts(ctx["sensitivity"]["svg"])
    # barh draws bottom-up: the tick labels and the value labels read in reverse rank order
    assert [t.split()[0] for t in texts if t.startswith("/")] == order[::-1]
    by_node = {n: (sq, m) for n, sq, m in rows}
    drawn = [format_value("top1_agreement", by_node[n][1]) if measured else format_value("sqnr_db", by_node[n][0])
             for n in order[::-1]]
    last_label = max(i for i, t in enumerate(texts) if t.startswith("/"))
    assert texts[last_label + 1:] == drawn  # the value beside each bar, after the axis and tick labels
    html = render_html(ctx)
    section = html[html.index('<section id="sensitivity">'):html.index("Kept in float by the accuracy fallback")]
    expected = "Top-1 agreement of the model output" if measured else "SQNR of the layer&#39;s output in the INT8 model"
    assert f"ranked by the {expected}" in section
    assert [m for m in re.findall(r'<td class="name">([^<]*)</td>', section)] == order


def test_html_flags_the_baseline_regression(written: tuple[Path, dict[str, Path], RunResults]) -> None:
    html = written[1]["html"].read_text()
    assert "1 regression against baseline run release-1" in html
    assert '<span class="delta worse">-0.67 pt</span>' in html
    assert html.count('class="badge fail">regression<') == 1


def test_histograms_show_each_method_threshold(written: tuple[Path, dict[str, Path], RunResults]) -> None:
    html = written[1]["html"].read_text()
    section = html[html.index('<section id="histograms">'):html.index('<section id="calibration">')]
    assert "<svg" in section and "entropy amax" in section and "minmax amax" in section
    assert "/conv1/Conv_output_0" in section  # the most sensitive layer's tensor is drawn


def test_markdown_mirrors_the_key_tables(written: tuple[Path, dict[str, Path], RunResults]) -> None:
    md = written[1]["md"].read_text()
    assert "## ❌ Gate FAILED: 3 of 4 rules failed" in md
    assert "| **FAIL** | ort-int8 speedup vs ort-fp32 >= 100<br>" in md
    assert "| pass | ort-int8 top1_drop <= 0.01 | 0.67 pt | <= 1 pt |" in md
    assert "97.33% (-0.67 pt ⚠)" in md
    rows = [line for line in md.splitlines() if line.startswith("| ort-") or line.startswith("| trt-")]
    assert len({line.split("|")[1].strip().split()[0] for line in rows}) == 6
    widths = {line.count("|") - line.count("\\|") for line in md.splitlines() if line.startswith("| ort-int8 |")}
    assert len(widths) >= 1


def test_summary_is_short_and_names_the_failures(written: tuple[Path, dict[str, Path], RunResults]) -> None:
    summary = written[1]["summary"].read_text()
    assert summary.startswith("### ❌ quantpipe: Gate FAILED: 3 of 4 rules failed")
    assert "ort-int8 speedup vs ort-fp32 @bs32" in summary
    assert summary.count("*skipped: tensorrt: not installed") == 1 and "| trt-fp32, trt-fp16, trt-int8 |" in summary
    assert len(summary) < 6000


def test_rendering_is_reproducible(written: tuple[Path, dict[str, Path], RunResults]) -> None:
    run, paths, results = written
    first = paths["html"].read_bytes()
    baseline = synthetic_results(run.parent / "base", run_id="release-1", int8_top1=0.98, seed=3)
    again = write_report(run, results, baseline=baseline)["html"].read_bytes()
    assert first == again


def test_plots_leave_no_global_state(tmp_path: Path) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    before = dict(matplotlib.rcParams)
    render_html(build_context(tmp_path, judged(None)))
    assert plt.get_fignums() == []
    assert dict(matplotlib.rcParams) == before


def test_sections_without_data_say_why(tmp_path: Path) -> None:
    run = tmp_path / "bare"
    results = judged(None)  # no calibration files written
    evals = tuple(dataclasses.replace(e, latency=()) for e in results.evaluations)
    bare = dataclasses.replace(results, sensitivity=(), fallback=None, calibration=(), evaluations=evals)
    html = write_report(run, bare, formats=["html"])["html"].read_text()
    assert "no per-layer sensitivity: not computed in this run" in html
    assert "no accuracy-driven fallback: build.fallback is not set" in html
    assert "no calibration histograms in this run" in html
    assert "no latency was measured in this run" in html
    assert "No accuracy-vs-latency plot" in html
    assert html.count("<svg") == 0
    notes = {"sensitivity": "no sensitivity analysis: disabled in pipeline.yaml"}
    html = write_report(run, bare, formats=["html"], notes=notes)["html"].read_text()
    assert "no sensitivity analysis: disabled in pipeline.yaml" in html


def test_report_says_which_data_chose_and_which_judged(tmp_path: Path) -> None:
    results = judged(None)
    judged_n = next(e.num_samples for e in results.evaluations if e.variant == results.reference)
    files = write_report(tmp_path / "run", results, formats=["md", "html", "json"])
    line = f"Fallback chose on: calibration data (512 samples); judged on: evaluation data ({judged_n} samples)."
    assert line in files["md"].read_text() and line in files["html"].read_text()
    fb = json.loads(files["json"].read_text())["fallback"]
    assert (fb["chosen_on"], fb["chosen_samples"]) == ("calibration", 512)
    # results written before the fallback recorded its data: no claim either way
    old = dataclasses.replace(results, fallback=dataclasses.replace(results.fallback, chosen_on=None, chosen_samples=None))
    assert "Fallback chose on" not in write_report(tmp_path / "old", old, formats=["md"])["md"].read_text()


def test_gate_not_evaluated_and_no_rules(tmp_path: Path) -> None:
    results = synthetic_results()
    md = write_report(tmp_path, results, formats=["md"])["md"].read_text()
    assert "Gate not evaluated" in md
    md = write_report(tmp_path, dataclasses.replace(results, gate=evaluate_gate(results, [])), formats=["md"])
    assert "Gate passed (no rules)" in md["md"].read_text()


def test_formats_pick_the_files(tmp_path: Path) -> None:
    paths = write_report(tmp_path, judged(None), formats=["junit"])
    assert set(paths) == {"junit", "summary"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junit.xml", "summary.md"]
    with pytest.raises(ConfigError, match="unknown format"):
        write_report(tmp_path, judged(None), formats=["pdf"])


def test_load_results_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a quantpipe run directory"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"schema_version": 1, "run_id": ')
    with pytest.raises(DataError, match=r"not valid JSON \(line 1"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"schema_version": 99, "tool_version": "9.0"}')
    with pytest.raises(DataError, match="schema_version 99; this quantpipe reads schema_version 1"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"run_id": "x"}')
    with pytest.raises(DataError, match="no schema_version"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"schema_version": 1, "run_id": "x"}')
    with pytest.raises(DataError, match="does not match the results schema: .*model"):
        load_results(tmp_path)


def _committed(run: Path) -> Path:
    """A run folder as `quantpipe run` leaves it: results.json and the completion record written last."""
    run.mkdir()
    (run / "results.json").write_text("{}")
    write_complete(run, "report")
    return run


def test_update_latest_points_at_the_newest_run(tmp_path: Path) -> None:
    first, second = _committed(tmp_path / "run-1"), _committed(tmp_path / "run-2")
    link = update_latest(tmp_path, first)
    assert link.is_symlink() and os.readlink(link) == "run-1"  # relative: the reports folder can move
    update_latest(tmp_path, second)
    assert os.readlink(tmp_path / "latest") == "run-2" and resolve_latest(tmp_path) == second.resolve()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_update_latest_without_symlinks_writes_latest_txt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _committed(tmp_path / "run-1")

    def no_symlinks(*args: object, **kwargs: object) -> None:
        raise OSError("symbolic links are not supported here")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    pointer = update_latest(tmp_path, run)
    assert pointer.name == "latest.txt" and pointer.read_text().strip() == "run-1"
    assert resolve_latest(tmp_path) == run


def test_update_latest_refuses_an_incomplete_run(tmp_path: Path) -> None:
    run = _committed(tmp_path / "run-1")
    (run / "report.html").write_text("<html>")
    write_complete(run, "report")
    (run / "report.html").unlink()  # a file the run recorded is gone
    with pytest.raises(DataError, match="report.html recorded in complete.json is missing"):
        update_latest(tmp_path, run)
    (run / "complete.json").unlink()
    with pytest.raises(DataError, match="not a complete run"):
        update_latest(tmp_path, run)
    assert not (tmp_path / "latest").exists()


def test_publish_ci_outside_github_does_nothing(tmp_path: Path) -> None:
    assert publish_ci(judged(None), tmp_path, env={}) == []
    assert list(tmp_path.iterdir()) == []


def test_publish_ci_on_github(tmp_path: Path) -> None:
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_WORKSPACE": str(tmp_path)}
    results = dataclasses.replace(judged(None), config_path=str(tmp_path / "pipeline.yaml"))
    lines = publish_ci(results, tmp_path / "run", env=env)
    text = summary.read_text()
    assert text.startswith("earlier step\n### ❌ quantpipe: Gate FAILED")  # appended, not overwritten
    errors = [line for line in lines if line.startswith("::error ")]
    assert len(errors) == 3
    assert errors[0].startswith("::error file=pipeline.yaml,title=quantpipe gate%3A ort-int8 speedup vs ort-fp32 >= 100::")
    assert errors[0].endswith("allowed >= 100x: FAILED")
    assert all("\n" not in line for line in lines)
    warnings = [line for line in lines if line.startswith("::warning ")]
    assert len(warnings) == 1 and "trt-fp32%2C trt-fp16%2C trt-int8 skipped::tensorrt: not installed" in warnings[0]


def test_publish_ci_finds_the_pipeline_file_from_the_run_folder(tmp_path: Path) -> None:
    # results.json records the pipeline file relative to the run folder, so a moved checkout still annotates it.
    env = {"GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(tmp_path / "checkout")}
    results = dataclasses.replace(judged(None), config_path="../../ci/pipeline.yaml")
    lines = publish_ci(results, tmp_path / "checkout/reports/run", env=env)
    assert lines[0].startswith("::error file=ci/pipeline.yaml,title="), lines[0]


def test_publish_ci_notice_when_the_gate_passes(tmp_path: Path) -> None:
    results = synthetic_results()
    ok = dataclasses.replace(results, gate=evaluate_gate(results, [GateRule(variant="ort-int8", metric="top1", min=0.9)]))
    lines = publish_ci(ok, None, env={"GITHUB_ACTIONS": "true"})
    assert lines[0] == "::notice title=quantpipe gate passed::1 rule passed in run 20250101T120000Z"
    assert not any(line.startswith("::error") for line in lines)


def test_baseline_without_regression(tmp_path: Path) -> None:
    base = synthetic_results(run_id="release-1")
    now = with_top1(base, "ort-int8", 0.9760)  # better: not a regression
    html = write_report(tmp_path, dataclasses.replace(now, run_id="next"), formats=["html"], baseline=base)["html"]
    text = html.read_text()
    assert "No regressions against baseline run release-1" in text
    assert '<span class="delta better">+0.27 pt</span>' in text


def test_histograms_npz_layouts(tmp_path: Path) -> None:
    from quantpipe.report.rundir import load_histograms

    calib = tmp_path / "calibration"
    calib.mkdir()
    counts = np.zeros(64, dtype=np.float64)
    counts[:10] = [50, 40, 30, 20, 10, 5, 3, 2, 1, 1]
    np.savez(calib / "histograms.npz", **{
        "a/counts": counts, "a/bin_width": np.float64(0.125), "a/range_exp": np.int64(5), "a/kind": np.asarray("activation"),
        "w/counts": counts, "w/bin_width": np.float64(0.5), "w/kind": np.asarray("weight"),
        "b/counts": counts[:8], "b/edges": np.linspace(0, 4, 9),
        "c/counts": counts,  # no bins: unusable
    })
    hists, reason = load_histograms(tmp_path)
    assert reason is None and sorted(hists) == ["a", "b"]  # weights are not activation histograms
    assert hists["a"].edges[-1] == 8.0 and hists["a"].counts.sum() == counts.sum()  # bin_width wins over range_exp
    assert hists["b"].edges[-1] == 4.0
    (calib / "histograms.npz").write_bytes(b"not a zip")
    hists, reason = load_histograms(tmp_path)
    assert hists == {} and reason is not None and "could not be read" in reason


def test_histograms_written_by_calibration_are_read(tmp_path: Path) -> None:
    histfile = pytest.importorskip("quantpipe.calibration.histfile", reason="the histograms file module is not present")
    from quantpipe.calibration.histogram import StreamingHistogram
    from quantpipe.report.rundir import load_histograms

    h = StreamingHistogram(2048)
    h.update(np.random.default_rng(0).standard_normal(5000).astype(np.float32))
    (tmp_path / "calibration").mkdir()
    histfile.save_histograms(tmp_path / "calibration" / "histograms.npz", {"x": h, "w": h}, {"x": "activation", "w": "weight"})
    hists, reason = load_histograms(tmp_path)
    assert reason is None and list(hists) == ["x"]
    x = hists["x"]
    last = int(np.flatnonzero(x.counts)[-1])
    assert x.counts.size == 2048 and x.edges[last] <= h.absmax <= x.edges[last + 1]  # absmax is in the last used bin
    assert hists["x"].counts.sum() == pytest.approx(5000)


def test_a_ctc_run_leads_with_its_line_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A text recognizer's variants carry no top-1: the tables, the summary and the terminal show its task's metrics.
    from quantpipe.console import print_summary

    base = synthetic_results(None)
    ctc = {"ort-fp32": (1.0, 0.0), "ort-fp16": (1.0, 0.0), "ort-int8": (0.875, 0.0137)}
    evals = tuple(dataclasses.replace(e, metrics={"line_agreement": ctc[e.variant][0], "cer": ctc[e.variant][1],
                                                  "cosine": e.metrics["cosine"], "sqnr_db": e.metrics["sqnr_db"]})
                  if e.variant in ctc else e for e in base.evaluations)
    results = dataclasses.replace(base, evaluations=evals)
    paths = write_report(tmp_path / "run", results)
    summary, report = paths["summary"].read_text(), paths["md"].read_text()
    assert "87.50%" in summary and "0.999520" not in summary  # the key accuracy is the line agreement, not cosine
    assert "Line agreement" in report and "CER" in report and "1.37%" in report
    print_summary(results)
    out = capsys.readouterr().out
    assert "line agree" in out and "87.50%" in out and "1.37%" in out
    assert "agree " not in out.replace("line agree", "")  # no empty top-1 agreement column


def test_the_terminal_table_is_not_cut_to_80_columns_in_a_log(capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A CI log (no terminal): rich drew 80 columns, and every variant name read "ort-fp…" (found probing).
    from quantpipe.console import print_summary

    monkeypatch.delenv("COLUMNS", raising=False)
    base = synthetic_results(None)
    wide = {"line_agreement": 0.955, "cer": 0.0100, "line_accuracy": 0.365, "label_cer": 0.2417, "cosine": 0.9997,
            "sqnr_db": 32.77, "max_abs_error": 3.85}
    evals = tuple(dataclasses.replace(e, metrics=wide) if not e.skipped else e for e in base.evaluations)
    print_summary(dataclasses.replace(base, evaluations=evals))
    out = capsys.readouterr().out
    assert "ort-fp32" in out and "ort-fp16" in out and "ort-int8" in out and "…" not in out.split("PASS")[0]


def test_the_front_end_kept_in_one_step_shares_its_step_row(tmp_path: Path) -> None:
    from quantpipe.artifacts import FallbackReport, FallbackStep

    steps = (FallbackStep("cqt_re", "Conv", "fp16", 0.66, 0.99), FallbackStep("cqt_im", "Conv", "fp16", 0.99, 0.99, True),
             FallbackStep("head", "Conv", "fp16", 0.99, 0.995))
    fb = FallbackReport(metric="map_iou", target=0.99, initial=0.66, final=0.995, met=True, num_quantizable=32,
                        steps=steps, chosen_on="calibration", chosen_samples=64)
    results = dataclasses.replace(synthetic_results(None), fallback=fb)
    md = write_report(tmp_path, results)["md"].read_text()
    assert "| 1 | `cqt_im` | Conv | fp16 | (same step: the linear front end) | |" in md
    assert "| 2 | `head` | Conv | fp16 |" in md


def test_an_empty_sensitivity_says_why_when_nothing_was_quantized(tmp_path: Path) -> None:
    # It said "set evaluate.sensitivity.enabled: true" where it was on and the fallback had kept every layer (probing).
    results = synthetic_results(None)
    quantize = {"quantized": 0, "num_quantizable": 3, "per_channel": True, "opset_before": 17, "opset_after": 17,
                "kept_float": [], "kept_float_count": 3, "shifted": 0, "bias_corrected": 0, "smoothed": 0,
                "gptq_rounded": 0, "warnings": []}
    variants = tuple(dataclasses.replace(v, details={"quantize": quantize}) if v.name == "ort-int8" else v
                     for v in results.variants)
    md = write_report(tmp_path, dataclasses.replace(results, variants=variants, sensitivity=()))["md"].read_text()
    assert "the INT8 model holds no quantized layer to measure" in md and "enabled: true" not in md


def test_a_baseline_judged_on_other_data_is_said_so(tmp_path: Path, caplog) -> None:
    # Another model's run as --baseline was compared without a word; results.json now records its evaluation data.
    from quantpipe.report.compare import compare_runs

    now = dataclasses.replace(synthetic_results(None, run_id="20250102T120000Z"), evaluation_data="sha256:aaa")
    same = dataclasses.replace(synthetic_results(None), evaluation_data="sha256:aaa")
    other = dataclasses.replace(same, evaluation_data="sha256:bbb")
    assert compare_runs(now, same)["same_data"] is True
    assert compare_runs(now, synthetic_results(None))["same_data"] is None  # not recorded: nothing to say
    with caplog.at_level("WARNING", logger="quantpipe"):
        assert compare_runs(now, other)["same_data"] is False
    assert "was judged on other evaluation data" in caplog.text
    files = write_report(tmp_path, now, baseline=other)
    for name in ("md", "summary"):
        assert "was judged on other evaluation data" in files[name].read_text(), name


def test_an_int8_variant_slower_on_this_cpu_is_said_to_be_built_for_tensorrt(tmp_path: Path) -> None:
    # A wake-word and VAD set ran 1.5-2.7x slower in INT8 on the CPU and the report said "2.44x slower" alone (found
    # probing): the user reads it as INT8 being slow, not as the Q/DQ file being TensorRT's.
    slow = write_report(tmp_path / "slow", synthetic_results(None, int8_speed=0.4))["md"].read_text()
    said = " ".join(slow.split())
    assert "slower than ort-fp32 at batch size 32 (onnxruntime runs the Q/DQ model as written" in said
    assert "on a CPU like this one, FP32 is the faster file" in said
    fast = write_report(tmp_path / "fast", synthetic_results(None, int8_speed=2.0))["md"].read_text()
    assert "the faster file" not in fast


def test_the_highlights_say_the_size_is_the_files(tmp_path: Path) -> None:
    # "ort-int8: detection agreement 0.0922, 3.2x smaller" read as the agreement being smaller (found probing).
    md = write_report(tmp_path, synthetic_results(None))["md"].read_text()
    assert "its file " in md and "x smaller" in md and ", 2.7x smaller" not in md


def test_the_terminal_table_shows_long_hook_names_whole(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Six hook columns read "grid_p…", "grid_…", "unwar…" on a terminal: nothing told them apart (found probing). More
    # than two get a table of their own, a row each.
    from quantpipe.console import print_summary

    monkeypatch.setenv("COLUMNS", "100")
    results = synthetic_results(tmp_path)
    names = ["grid_px_mean", "grid_px_p95", "grid_px_max", "unwarp_psnr_db", "unwarp_ssim", "unwarp_px_mae"]
    evals = tuple(dataclasses.replace(e, metrics={**e.metrics, **dict.fromkeys(names, 1.25)}) for e in results.evaluations)
    print_summary(dataclasses.replace(results, evaluations=evals))
    rows = [line.split("│")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert {r[0].strip(): [c.strip() for c in r[1:]] for r in rows if r[0].strip() in names} == \
        dict.fromkeys(names, ["1.25", "1.25", "1.25"])  # a row per metric, a column per variant that ran
