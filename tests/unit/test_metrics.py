"""Metrics checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np

from quantpipe import metrics as M


def test_topk() -> None:
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = np.array([1, 1, 0])
    assert M.topk_accuracy(logits, labels, 1) == 1 / 3
    assert M.topk_accuracy(logits, labels, 2) == 2 / 3
    assert M.topk_accuracy(logits, labels, 5) == 1.0  # k clipped to the class count


def test_agreement_cosine_sqnr() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    out = np.array([[1.0, 0.1], [0.5, 0.4]])
    assert M.top1_agreement(out, ref) == 0.5
    cos0 = 1.0 / math.sqrt(1.01)
    cos1 = 0.8 / (2.0 * math.sqrt(0.41))
    assert math.isclose(M.mean_cosine(out, ref), (cos0 + cos1) / 2)
    noise = 0.01 + 0.25 + 2.56
    assert math.isclose(M.sqnr_db(out, ref), 10 * math.log10(5.0 / noise))
    assert M.sqnr_db(ref, ref) == math.inf
    assert math.isclose(M.max_abs_error(out, ref), 1.6)


def test_cosine_of_zero_vectors() -> None:
    z = np.zeros((2, 3))
    assert M.mean_cosine(z, z) == 1.0
    assert M.mean_cosine(z, np.ones((2, 3))) == 0.0


def test_cosine_of_one_value_per_sample_sees_errors_that_keep_the_sign() -> None:
    ref = np.array([[0.9], [0.1], [0.5]])
    out = np.array([[0.1], [0.9], [0.5]])  # every sign kept, two samples badly wrong
    expected = float(ref[:, 0] @ out[:, 0] / (np.linalg.norm(ref) * np.linalg.norm(out)))
    assert math.isclose(M.mean_cosine(out, ref), expected)
    assert M.mean_cosine(out, ref) < 0.7
    assert M.mean_cosine(ref.reshape(3), ref.reshape(3)) == 1.0  # [N] reads as [N, 1]
    assert math.isclose(M.mean_cosine(out.reshape(3), ref.reshape(3)), expected)


def test_squared_error_is_the_float64_expression_bit_for_bit_and_leaves_its_inputs() -> None:
    sums = M.SquaredSums()
    rng = np.random.default_rng(11)
    y = rng.normal(size=(4, 300)).astype(np.float32)
    y[0, :3] = [-0.0, 0.0, 1e30]
    x = (y + rng.normal(scale=1e-3, size=y.shape)).astype(np.float64)
    y0, x0 = y.copy(), x.copy()
    for offset in (0.0, 0.75):
        want = float(np.sum((np.asarray(y, dtype=np.float64) + offset - x) ** 2))
        assert sums.error(y, x, offset) == want
    assert np.array_equal(y, y0) and np.array_equal(x, x0)


def test_squared_sums_reuse_one_buffer_and_give_the_plain_expressions_bits() -> None:
    rng = np.random.default_rng(12)
    sums = M.SquaredSums()
    # large, then smaller, then larger again: the buffer is reused and regrown; float32 and float64 references
    for shape in ((8, 16, 33, 33), (3, 70), (2, 5, 7), (16, 16, 40, 40)):
        y = rng.normal(size=shape).astype(np.float32)
        x32 = (y + rng.normal(scale=1e-3, size=shape)).astype(np.float32)
        y0, x0 = y.copy(), x32.copy()
        x64 = np.asarray(x32, dtype=np.float64)
        assert sums.signal(x32) == float(np.sum(np.square(x64)))
        assert sums.signal(x64) == float(np.sum(x64**2))
        for offset in (0.0, -1.25):
            want = float(np.sum((np.asarray(y, dtype=np.float64) + offset - x64) ** 2))
            assert sums.error(y, x32, offset) == want
            assert sums.error(y, x64, offset) == want
        assert np.array_equal(y, y0) and np.array_equal(x32, x0)
    # a reference that broadcasts against the output, and a 0-d tensor
    y = rng.normal(size=(4, 6)).astype(np.float32)
    r = rng.normal(size=(6,)).astype(np.float32)
    assert sums.error(y, r) == float(np.sum((y.astype(np.float64) - r.astype(np.float64)) ** 2))
    assert sums.signal(np.float32(3.0)) == 9.0


def test_the_worst_channel_of_a_head_is_seen_under_the_pooled_sqnr() -> None:
    from quantpipe.evaluate import accuracy_metrics
    from quantpipe.taskmetrics import CLASSIFICATION, TaskSpec

    rng = np.random.default_rng(4)
    ref = np.concatenate([rng.uniform(0, 320, (3, 4, 50)), rng.uniform(0, 1, (3, 6, 50))], axis=1)  # boxes, scores
    out = ref.copy()
    out[:, :4] += rng.normal(0, 0.3, (3, 4, 50))  # boxes: ~58 dB
    out[:, 4:] += rng.normal(0, 0.1, (3, 6, 50))  # scores: ~15 dB, invisible in the pooled number
    axis, c, db = M.worst_channel_sqnr_db(out, ref)
    assert axis == 1 and c >= 4 and db < 20 < M.sqnr_db(out, ref) - 30
    got = accuracy_metrics(out, ref, None, ["sqnr_db"])
    assert got["channel_sqnr_min_db"] == db and got["channel_sqnr_min_index"] == c and got["channel_sqnr_min_axis"] == 1
    # The same head laid out [N, anchors, 4 + classes] (PicoDet's): channels on the last axis, not one per anchor.
    last = M.worst_channel_sqnr_db(out.transpose(0, 2, 1), ref.transpose(0, 2, 1))
    assert last == (2, c, db)
    # One anchor of a [N, anchors, classes] head with tiny scores is no channel: its own SQNR says nothing.
    tiny = rng.uniform(0, 1, (3, 500, 10))
    tiny[:, 7] *= 1e-3
    noisy = tiny + rng.normal(0, 1e-3, tiny.shape)
    assert M.worst_channel_sqnr_db(noisy, tiny)[0] == 2
    # Channels alike, a classifier's [N, classes], a CTC output (axis 1 is time), an identical output: nothing.
    even = ref[:, 4:] + rng.normal(0, 0.01, (3, 6, 50))
    assert "channel_sqnr_min_db" not in accuracy_metrics(even, ref[:, 4:], None, ["sqnr_db"])
    assert M.worst_channel_sqnr_db(out[:, :, 0], ref[:, :, 0]) is None
    assert "channel_sqnr_min_db" not in accuracy_metrics(out, ref, None, ["sqnr_db"], task=TaskSpec(task="ctc"))
    assert "channel_sqnr_min_db" not in accuracy_metrics(ref, ref, None, ["sqnr_db"], task=CLASSIFICATION)
