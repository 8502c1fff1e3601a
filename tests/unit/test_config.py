"""pipeline.yaml validation: unknown keys with hints, YAML line numbers, paths, gate rule checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantpipe.config import load_config, parse_config, variant_name
from quantpipe.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = {
    "model": {"path": "m.onnx"},
    "data": {"calibration": {"path": "c.npz"}, "evaluation": {"path": "e.npz", "labels": "label"}},
}


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(text)
    return p


def test_repository_pipeline_yaml_is_valid() -> None:
    cfg = load_config(ROOT / "pipeline.yaml")
    assert cfg.model.path == (ROOT / "examples/digits/digits_cnn.onnx").resolve()
    assert "ort-int8" in cfg.variant_names() and cfg.variant_names()[0] == "ort-fp32"


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = parse_config(MINIMAL, base_dir=tmp_path)
    assert cfg.model.path == (tmp_path / "m.onnx").resolve()
    assert cfg.data.evaluation.path == (tmp_path / "e.npz").resolve()
    assert cfg.calibration.methods == ["entropy", "minmax"] and cfg.calibration.use == "auto"
    assert cfg.variant_names() == ["ort-fp32", "ort-fp16", "ort-int8"]  # tensorrt off by default
    assert cfg.report.dir == (tmp_path / "reports").resolve()


def test_unknown_key_gets_did_you_mean(tmp_path: Path) -> None:
    raw = {**MINIMAL, "data": {**MINIMAL["data"], "batchsize": 4}}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    msg = str(e.value)
    assert "data.batchsize: unknown key 'batchsize' (did you mean 'batch_size'?)" in msg
    assert e.value.exit_code == 2


def test_unknown_top_level_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'calibraton' \(did you mean 'calibration'\?\)"):
        parse_config({**MINIMAL, "calibraton": {}})


def test_unknown_method_is_an_error_not_a_fallback() -> None:
    with pytest.raises(ConfigError, match=r"calibration.methods\[0\].*'entropy', 'minmax', 'percentile' or 'mse'.*got 'kl'"):
        parse_config({**MINIMAL, "calibration": {"methods": ["kl"]}})


def test_use_must_be_computed() -> None:
    with pytest.raises(ConfigError, match="calibration.use is 'mse'"):
        parse_config({**MINIMAL, "calibration": {"methods": ["entropy"], "use": "mse"}})


def test_malformed_yaml_reports_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "model:\n  path: m.onnx\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(p)


def test_missing_files_are_named(tmp_path: Path) -> None:
    p = _write(tmp_path, "model: {path: nope.onnx}\ndata:\n  calibration: {path: c.npz}\n  evaluation: {path: e.npz}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "model.path" in str(e.value) and "data.calibration.path" in str(e.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("rule", "pattern"),
    [
        ({"variant": "ort-int9", "metric": "top1_drop", "max": 0.01}, r"unknown variant 'ort-int9' \(did you mean 'ort-int8'\?\)"),
        ({"variant": "ort-int8", "metric": "top1drop", "max": 0.01}, r"unknown metric 'top1drop' \(did you mean 'top1_drop'\?\)"),
        ({"variant": "ort-int8", "metric": "top1_drop"}, "needs `min` or `max`"),
        ({"variant": "ort-int8", "metric": "speedup", "vs": "trt-fp32", "min": 1.2}, "unknown variant 'trt-fp32'"),
        ({"variant": "ort-int8", "metric": "cosine", "vs": "ort-fp32", "min": 0.9}, "`vs` applies only to metric speedup"),
    ],
)
def test_bad_gate_rules(rule: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_config({**MINIMAL, "gate": {"rules": [rule]}})


def test_rule_description() -> None:
    cfg = parse_config({**MINIMAL, "gate": {"rules": [{"variant": "ort-int8", "metric": "speedup", "vs": "ort-fp32", "min": 1.2, "batch_size": 32}]}})
    assert cfg.gate.rules[0].describe() == "ort-int8 speedup vs ort-fp32 @bs32 >= 1.2"


def test_fallback_needs_bound() -> None:
    with pytest.raises(ConfigError, match="needs `min`"):
        parse_config({**MINIMAL, "build": {"fallback": {"metric": "top1_agreement"}}})


def test_validation_split_is_optional_and_resolved(tmp_path: Path) -> None:
    assert parse_config(MINIMAL, base_dir=tmp_path).data.validation is None
    data = {**MINIMAL["data"], "validation": {"path": "v.npz", "labels": "label", "max_samples": 100}}
    v = parse_config({**MINIMAL, "data": data}, base_dir=tmp_path).data.validation
    assert v is not None and v.path == (tmp_path / "v.npz").resolve() and v.labels == "label" and v.max_samples == 100


def test_top1_drop_fallback_needs_labelled_validation_split() -> None:
    """The fallback never chooses on data.evaluation, so top1_drop needs labels somewhere else."""
    fallback = {"fallback": {"metric": "top1_drop", "max": 0.01}}
    with pytest.raises(ConfigError, match=r"top1_drop.*data\.validation.*top1_agreement") as err:
        parse_config({**MINIMAL, "build": fallback})  # labelled evaluation data is not enough
    assert err.value.exit_code == 2
    unlabelled = {**MINIMAL["data"], "validation": {"path": "v.npz"}}
    with pytest.raises(ConfigError, match="data.validation"):
        parse_config({**MINIMAL, "data": unlabelled, "build": fallback})
    labelled = {**MINIMAL["data"], "validation": {"path": "v.npz", "labels": "label"}}
    assert parse_config({**MINIMAL, "data": labelled, "build": fallback}).build.fallback is not None
    agreement = {"fallback": {"metric": "top1_agreement", "min": 0.99}}
    assert parse_config({**MINIMAL, "build": agreement}).data.validation is None  # calibration data suffices


def test_missing_validation_file_is_named(tmp_path: Path) -> None:
    for name in ("m.onnx", "c.npz", "e.npz"):
        (tmp_path / name).write_bytes(b"")
    p = _write(tmp_path, "model: {path: m.onnx}\ndata:\n  calibration: {path: c.npz}\n"
                         "  evaluation: {path: e.npz}\n  validation: {path: v.npz}\n")
    with pytest.raises(ConfigError, match=r"data\.validation\.path: .*v\.npz does not exist"):
        load_config(p)


def test_variant_name() -> None:
    assert variant_name("tensorrt", "fp16") == "trt-fp16"


def test_quantize_section_maps_onto_quantize_options() -> None:
    from quantpipe.config import DEFAULT_FLOAT_OPS
    from quantpipe.quantize import QuantizeOptions

    build = {"quantize": {"weight_rounding": "gptq", "bias_correction": False, "smooth_alpha": None,
                          "keep_float_nodes": ["conv1"], "quantize_activation_matmul": False,
                          "shift_nonnegative": False}}
    opts = QuantizeOptions.from_config(parse_config({**MINIMAL, "build": build}).build.quantize)
    assert opts.weight_rounding == "gptq" and opts.bias_correction is False and opts.smooth_alpha is None
    assert opts.keep_float_nodes == frozenset({"conv1"}) and opts.keep_float_ops == DEFAULT_FLOAT_OPS
    assert opts.quantize_activation_matmul is False and opts.shift_nonnegative is False
    defaults = QuantizeOptions.from_config(parse_config(MINIMAL).build.quantize)
    assert defaults.weight_rounding == "nearest" and defaults.bias_correction and defaults.smooth_alpha == 0.7
    assert defaults.split_activations == "auto"
    off = {"quantize": {"split_activations": "off"}}
    assert QuantizeOptions.from_config(parse_config({**MINIMAL, "build": off}).build.quantize).split_activations == "off"
    given = {"quantize": {"split_activations": {"relu1": 3}}}
    assert QuantizeOptions.from_config(parse_config({**MINIMAL, "build": given}).build.quantize).split_activations == {"relu1": 3}
    with pytest.raises(ConfigError):
        parse_config({**MINIMAL, "build": {"quantize": {"split_activations": "sometimes"}}})


def test_unknown_weight_rounding_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"build.quantize.weight_rounding.*'nearest' or 'gptq'.*got 'adaround'"):
        parse_config({**MINIMAL, "build": {"quantize": {"weight_rounding": "adaround"}}})


def test_unknown_key_named_like_a_pydantic_tag_is_reported() -> None:
    # A user key called `literal` was filtered out with pydantic's `literal[...]` branch tags: IndexError.
    with pytest.raises(ConfigError, match="unknown key 'literal'"):
        parse_config({**MINIMAL, "literal": None})


@pytest.mark.parametrize("key", ["literal[", "literal['a']", "function-after[x]"])
def test_unknown_key_that_looks_like_a_branch_tag_is_reported(key: str) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({**MINIMAL, key: None})


def test_a_gate_rule_on_a_metric_the_pipeline_cannot_measure_is_refused_at_load() -> None:
    # Before: found only after the whole run, the gate failing with exit 1 (a map_iou rule on a classifier, probing).
    with pytest.raises(ConfigError, match=r"gate.rules\[0\].metric map_iou is measured only with evaluate.task: dense "
                                          r"\(this pipeline's task is classification\)"):
        parse_config({**MINIMAL, "gate": {"rules": [{"variant": "ort-int8", "metric": "map_iou", "min": 0.9}]}})
    unlabelled = {**MINIMAL, "data": {**MINIMAL["data"], "evaluation": {"path": "e.npz"}}}
    with pytest.raises(ConfigError, match=r"gate.rules\[0\].metric top1 is measured against labels"):
        parse_config({**unlabelled, "gate": {"rules": [{"variant": "ort-int8", "metric": "top1", "min": 0.9}]}})
    ok = parse_config({**unlabelled, "evaluate": {"task": "dense"},
                       "gate": {"rules": [{"variant": "ort-int8", "metric": "map_iou", "min": 0.9},
                                          {"variant": "ort-int8", "metric": "cosine", "min": 0.9}]}})
    assert len(ok.gate.rules) == 2
    # top-1 is read from class scores under task classification alone: under another it was never measured, and the
    # gate failed the rule after the whole run
    with pytest.raises(ConfigError, match=r"top1_agreement is measured only with evaluate.task: classification \(this "
                                          r"pipeline's task is dense\)"):
        parse_config({**unlabelled, "evaluate": {"task": "dense"},
                      "gate": {"rules": [{"variant": "ort-int8", "metric": "top1_agreement", "min": 0.9}]}})


def test_a_latency_rule_at_a_batch_size_never_timed_is_refused_at_load() -> None:
    # Before: the gate failed it after the whole run (found probing).
    lat = {"latency": {"batch_sizes": [1, 8]}}
    with pytest.raises(ConfigError, match=r"gate.rules\[0\] judges latency_ms at batch size 4, which "
                                          r"evaluate.latency.batch_sizes \(\[1, 8\]\) does not time"):
        parse_config({**MINIMAL, "evaluate": lat, "gate": {"rules": [
            {"variant": "ort-int8", "metric": "latency_ms", "batch_size": 4, "max": 5.0}]}})
    ok = parse_config({**MINIMAL, "evaluate": lat, "gate": {"rules": [
        {"variant": "ort-int8", "metric": "latency_ms", "batch_size": 8, "max": 5.0}]}})
    assert ok.gate.rules[0].batch_size == 8


def test_a_gate_rule_on_a_metric_evaluate_metrics_leaves_out_is_refused_at_load() -> None:
    # A list of hooks alone in evaluate.metrics replaced the default one, and a cosine rule failed after the whole run
    # (exit 1, "cosine was not measured"; found probing a wake-word model).
    hooks_only = {**MINIMAL, "evaluate": {"metrics": ["mypkg.metrics:wake"]}}
    with pytest.raises(ConfigError, match=r"gate.rules\[0\].metric cosine is not measured: evaluate.metrics is "
                                          r"\[mypkg.metrics:wake\], which replaces the default list. Add cosine to it"):
        parse_config({**hooks_only, "gate": {"rules": [{"variant": "ort-int8", "metric": "cosine", "min": 0.99}]}})
    with pytest.raises(ConfigError, match=r"metric top1_drop is not measured: .* Add top1 to it"):
        parse_config({**hooks_only, "gate": {"rules": [{"variant": "ort-int8", "metric": "top1_drop", "max": 0.01}]}})
    ok = parse_config({**hooks_only, "evaluate": {"metrics": ["mypkg.metrics:wake", "cosine"]},
                       "gate": {"rules": [{"variant": "ort-int8", "metric": "cosine", "min": 0.99},
                                          {"variant": "ort-int8", "metric": "wake", "min": 0.99},
                                          {"variant": "ort-int8", "metric": "other_outputs_sqnr_db", "min": 20}]}})
    assert len(ok.gate.rules) == 3
