"""The evaluate stage: labels checked against the class count the outputs show, before anything is scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantpipe.artifacts import TensorInfo
from quantpipe.data import open_dataset
from quantpipe.errors import DataError
from quantpipe.evaluate import VariantOutputs, evaluate_variant, run_outputs

IMG = (TensorInfo("input", "float32", ("batch", 2)),)


class _Classifier:
    """A runner whose output has `classes` columns (a model with a dynamic class dimension)."""

    name = "fake"

    def __init__(self, classes: int) -> None:
        self.classes = classes
        self.batches = 0

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches += 1
        n = feeds["input"].shape[0]
        return {"logits": np.eye(n, self.classes, dtype=np.float32)}


def _data(tmp_path: Path, labels: np.ndarray) -> Path:
    p = tmp_path / "eval.npz"
    np.savez(p, input=np.zeros((len(labels), 2), np.float32), label=labels)
    return p


def test_labels_beyond_the_class_count_stop_after_the_first_batch(tmp_path: Path) -> None:
    ds = open_dataset(_data(tmp_path, np.array([0, 1, 2, 57] * 8)), IMG, labels_key="label", role="evaluation")
    runner = _Classifier(10)
    with pytest.raises(DataError, match=r"'label' holds 8 invalid label\(s\) \(e\.g\. 57\); class indices must be in "
                                        r"\[0, 10\): output 'logits' has 10 classes"):
        run_outputs(runner, ds, "logits", 4)  # type: ignore[arg-type]
    assert runner.batches == 1


def test_the_class_count_is_recorded_for_the_gate(tmp_path: Path) -> None:
    ds = open_dataset(_data(tmp_path, np.arange(8) % 3), IMG, labels_key="label", role="evaluation")
    res, _ = evaluate_variant(_Classifier(3), ds, output="logits", batch_size=4, metrics=["top1"],  # type: ignore[arg-type]
                              reference=None, ref_labelled=None)
    assert res.num_classes == 3 and res.metrics["top1"] == pytest.approx(4 / 8)


class _TimeFirst:
    """A runner whose output puts time before the batch ([T, N, C], as an RNN's often does)."""

    name = "rnn"

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"seq": np.zeros((7, feeds["input"].shape[0], 3), np.float32)}


def test_an_output_whose_leading_axis_is_not_the_batch_is_refused_in_any_batching(tmp_path: Path) -> None:
    # Scored as rows it would compare timesteps, and a shard count would change the numbers: refused, saying why.
    from quantpipe.errors import DataError

    ds = open_dataset(_data(tmp_path, np.zeros(8, np.int64)), IMG, role="evaluation")
    for batch_size in (1, 4):
        with pytest.raises(DataError, match=r"shape \[7, \d, 3\] for a batch of \d sample\(s\): its axis 0 is "
                                                  r"not the batch.*Set model.output_batch_axis"):
            run_outputs(_TimeFirst(), ds, "seq", batch_size)  # type: ignore[arg-type]
        # With its batch axis named, the same output is read samples first.
        out = run_outputs(_TimeFirst(), ds, "seq", batch_size, output_axis=1)  # type: ignore[arg-type]
        assert out.shape == (8, 7, 3)


def test_outputs_that_change_shape_with_the_samples_are_bad_input_exit_2() -> None:
    from quantpipe.errors import DataError
    from quantpipe.evaluate import stack_outputs

    with pytest.raises(DataError, match="evaluation samples differ in shape") as e:
        stack_outputs([np.zeros((2, 3, 40, 60), np.float32), np.zeros((1, 3, 48, 64), np.float32)], "ort-int8", "map")
    assert e.value.exit_code == 2


class _Clocked:
    """A runner whose every run 'takes' `seconds` (no sleeping): what measure_latency asks of it is recorded."""

    name = "ort-fp32"
    device = "cpu"

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, []

    def measure(self, feeds, warmup, iterations):
        from quantpipe.backends.base import Timings

        self.calls.append((warmup, iterations))
        return Timings(total=np.full(iterations, self.seconds * 1e3), timer="perf_counter")


def test_latency_of_a_slow_model_is_cut_to_its_budget_and_said(caplog) -> None:
    import logging

    from quantpipe.evaluate import MIN_LATENCY_ITERATIONS, measure_latency

    fast = _Clocked(0.01)
    stats = measure_latency(fast, {}, 32, 10, 50, 60.0)
    assert fast.calls == [(0, 1), (9, 50)] and (stats.warmup, stats.iterations) == (10, 50)  # the probe: a warm-up
    slow = _Clocked(2.0)  # 60 runs would take 120 s
    with caplog.at_level(logging.INFO, logger="quantpipe"):
        stats = measure_latency(slow, {}, 32, 10, 50, 60.0)
    assert slow.calls == [(0, 1), (2, 27)] and (stats.warmup, stats.iterations) == (3, 27)
    assert "one run takes 2.0 s, so 27 timed runs (+3 warm-up) instead of 50 (+10)" in caplog.text
    glacial = _Clocked(30.0)
    stats = measure_latency(glacial, {}, 32, 10, 50, 60.0)
    assert glacial.calls == [(0, 1), (0, MIN_LATENCY_ITERATIONS)] and stats.iterations == MIN_LATENCY_ITERATIONS
    unbounded = _Clocked(2.0)
    with caplog.at_level(logging.INFO, logger="quantpipe"):
        measure_latency(unbounded, {}, 32, 0, 50, None)
    assert unbounded.calls == [(0, 1), (0, 50)] and "about 100 s more (50 runs of 2.0 s)" in caplog.text


def test_latency_on_a_busy_machine_is_said_once(caplog, monkeypatch) -> None:
    # The same two models gave a speedup of 1.27x in one run and 0.58x in the next on a shared host (found probing).
    import logging

    from quantpipe import evaluate

    monkeypatch.setattr(evaluate, "_busy_said", set())
    monkeypatch.setattr(evaluate.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(evaluate.os, "getloadavg", lambda: (2.5, 2.0, 2.0), raising=False)
    with caplog.at_level(logging.WARNING, logger="quantpipe"):
        evaluate.measure_latency(_Clocked(0.01), {}, 1, 1, 5, None)  # 1.25 per core: not busy
    assert "busy machine" not in caplog.text
    monkeypatch.setattr(evaluate.os, "getloadavg", lambda: (6.2, 5.0, 4.0), raising=False)
    with caplog.at_level(logging.WARNING, logger="quantpipe"):
        for _ in range(3):
            evaluate.measure_latency(_Clocked(0.01), {}, 1, 1, 5, None)
    assert caplog.text.count("latency is being measured on a busy machine (1-minute load average 6.2 on 2 cores)") == 1


def test_a_reference_output_that_ignores_the_input_is_warned_about(caplog) -> None:
    import logging

    from quantpipe.evaluate import warn_if_constant

    with caplog.at_level(logging.WARNING, logger="quantpipe"):
        assert warn_if_constant(np.tile(np.arange(6, dtype=np.float32).reshape(1, 2, 3), (4, 1, 1)), "scores")
        assert not warn_if_constant(np.arange(24, dtype=np.float32).reshape(4, 2, 3), "scores")
        assert not warn_if_constant(np.zeros((1, 3), np.float32), "scores")  # one sample: nothing to compare
    assert caplog.text.count("is the same for all 4 evaluation samples") == 1


def test_a_float_output_equal_to_the_reference_is_recorded_whatever_the_metrics(tmp_path: Path) -> None:
    from quantpipe.artifacts import IDENTICAL_KEY

    ds = open_dataset(_data(tmp_path, np.arange(8) % 3), IMG, labels_key="label", role="evaluation")
    ref = np.concatenate([np.eye(4, 3, dtype=np.float32)] * 2)  # what _Classifier gives in batches of 4
    same, _ = evaluate_variant(_Classifier(3), ds, output="logits", batch_size=4, metrics=["cosine"],  # type: ignore[arg-type]
                               reference=ref, ref_labelled=None)
    assert same.metrics[IDENTICAL_KEY] == 1.0 and "max_abs_error" not in same.metrics
    moved, _ = evaluate_variant(_Classifier(3), ds, output="logits", batch_size=4, metrics=["cosine"],  # type: ignore[arg-type]
                                reference=ref + np.float32(1e-3), ref_labelled=None)
    assert IDENTICAL_KEY not in moved.metrics
    labels, _ = evaluate_variant(_Classifier(3), ds, output="logits", batch_size=4, metrics=["cosine"],  # type: ignore[arg-type]
                                 reference=np.arange(8, dtype=np.int64), ref_labelled=None,
                                 outputs=VariantOutputs(np.arange(8, dtype=np.int64)))
    assert IDENTICAL_KEY not in labels.metrics  # an int64 label output: ArgMax hides the INT8 noise, not measured


def test_a_cosine_rule_on_one_value_per_sample_is_warned_about(caplog) -> None:
    # A pitch tracker's Hz output: an octave (x2) and a semitone (x1.0595) both keep the cosine at 1.0 (found probing).
    import logging

    from quantpipe.config import GateRule
    from quantpipe.evaluate import warn_if_cosine_blind
    from quantpipe.metrics import mean_cosine

    hz = np.linspace(100.0, 400.0, 8, dtype=np.float32).reshape(8, 1)
    assert mean_cosine(hz * 2, hz) == pytest.approx(1.0)
    rule = GateRule(variant="ort-int8", metric="cosine", min=0.99)
    with caplog.at_level(logging.WARNING, logger="quantpipe"):
        assert warn_if_cosine_blind(hz, "f0", [rule]) and warn_if_cosine_blind(hz.ravel(), "f0", [rule])
        assert not warn_if_cosine_blind(hz, "f0", [GateRule(variant="ort-int8", metric="sqnr_db", min=30)])
        assert not warn_if_cosine_blind(np.tile(hz, (1, 3)), "f0", [rule])  # a vector per sample has a direction
    assert caplog.text.count("gate rule(s) on cosine (ort-int8) judge model.output 'f0', one value per sample") == 2


def test_labels_nothing_reads_are_warned_about(caplog) -> None:
    # A per-character sigmoid [N, 1] with labels: top-1 showed '—' and nothing said the labels went unused.
    import logging

    from quantpipe.evaluate import warn_if_labels_unread
    from quantpipe.taskmetrics import CLASSIFICATION, TaskSpec

    labels = np.zeros(8, np.int64)
    with caplog.at_level(logging.WARNING, logger="quantpipe"):
        assert warn_if_labels_unread(np.zeros((8, 1), np.float32), "p", CLASSIFICATION, labels)
        assert not warn_if_labels_unread(np.zeros((8, 3), np.float32), "p", CLASSIFICATION, labels)
        assert not warn_if_labels_unread(np.zeros((8, 1), np.float32), "p", CLASSIFICATION, None)
        assert not warn_if_labels_unread(np.zeros((8, 4, 4), np.float32), "p", TaskSpec(task="dense"), labels)
    assert caplog.text.count("data.evaluation has labels, but model.output 'p' has shape [8, 1]") == 1


def test_an_output_around_an_offset_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    # A quality score (MOS about 3, spread 0.3): SQNR counts the 3 as signal; class logits vary around their mean.
    from quantpipe.evaluate import warn_if_offset_dominates
    from quantpipe.metrics import sqnr_db
    from quantpipe.taskmetrics import CLASSIFICATION, TaskSpec

    rng = np.random.default_rng(0)
    mos = 3.0 + 0.3 * rng.standard_normal((64, 3))
    with caplog.at_level("WARNING"):
        assert warn_if_offset_dominates(mos, "mos", CLASSIFICATION)
    noisy = mos + 0.15 * rng.standard_normal(mos.shape)  # half the spread: an error anyone would call large
    assert sqnr_db(noisy, mos) > 25  # what the plain SQNR says
    assert "read 20.5 dB above the error measured against the outputs' own variation" in caplog.text
    assert "set evaluate.task: regression" in caplog.text  # whose centered_sqnr_db measures against that variation
    assert not warn_if_offset_dominates(rng.standard_normal((64, 10)) * 4, "logits", CLASSIFICATION)
    assert not warn_if_offset_dominates(np.full((64, 3), 3.0), "constant", CLASSIFICATION)  # said as constant
    assert not warn_if_offset_dominates(mos, "mos", TaskSpec(task="dense"))  # a task metric reads it
    assert not warn_if_offset_dominates(mos, "mos", TaskSpec(task="regression"))


def test_the_offset_is_read_on_the_real_positions_where_a_mask_is_set(caplog: pytest.LogCaptureFixture) -> None:
    # A score per token (about 5, spread 0.3) padded with zeros: the padding hid the offset (found checking the fix).
    from quantpipe.evaluate import warn_about_reference
    from quantpipe.taskmetrics import TaskSpec

    rng = np.random.default_rng(1)
    valid = np.arange(8)[None, :] < rng.integers(2, 9, size=(64, 1))
    scores = np.where(valid, 5.0 + 0.3 * rng.standard_normal((64, 8)), 0.0)[..., None]
    real = scores[valid].astype(np.float64)
    expected = 10 * np.log10(np.sum(real ** 2) / np.sum((real - real.mean()) ** 2))
    with caplog.at_level("WARNING"):
        warn_about_reference(scores, "s", TaskSpec(task="classification", valid_mask="m"), [], None, valid)
    assert f"read {expected:.1f} dB above the error" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_about_reference(scores, "s", TaskSpec(task="classification"), [], None, None)
    padded = scores.reshape(64, -1).astype(np.float64)  # over every position, the zeros hide most of it
    hidden = 10 * np.log10(np.sum(padded ** 2) / np.sum((padded - padded.mean(axis=0)) ** 2))
    assert hidden < expected - 5 and f"read {hidden:.1f} dB above the error" in caplog.text


def test_top1_metrics_listed_for_an_output_they_cannot_read_are_warned_about(caplog) -> None:
    # A phoneme BERT's [N, T, C] output with top1_agreement listed: a dash in every table and no word why (found
    # probing). Said once where the list names them; the default list (every classifier metric) says nothing.
    import logging

    from quantpipe.evaluate import warn_about_reference
    from quantpipe.taskmetrics import TaskSpec

    tokens = np.random.default_rng(0).standard_normal((4, 5, 7)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="quantpipe"):
        warn_about_reference(tokens, "mlm", TaskSpec(), [], asked=["top1_agreement", "cosine"])
        warn_about_reference(tokens, "mlm", TaskSpec(), [], asked=())  # evaluate.metrics left at its default
        warn_about_reference(tokens.reshape(20, 7), "mlm", TaskSpec(), [], asked=["top1_agreement"])  # [N, classes]
        valid = np.ones((4, 5), bool)  # evaluate.valid_mask: each position a sample, [20, 7]
        warn_about_reference(tokens, "mlm", TaskSpec(valid_mask="mask"), [], valid=valid, asked=["top1_agreement"])
    assert caplog.text.count("evaluate.metrics lists top1_agreement, but model.output 'mlm' is [4, 5, 7]") == 1
    assert "set evaluate.valid_mask" in caplog.text
