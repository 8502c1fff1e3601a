"""The searches over several workers give one process's results exactly: the same sensitivity table (every
number), the same layers kept by the fallback, the same steps and the same Q/DQ model bytes; with local worker
processes and on a real Ray cluster. And small work stays in this process: no pool is started for it."""

from __future__ import annotations

import pytest

from quantpipe.calibration import calibrate
from quantpipe.candidates import FP32_BASE, CandidateShare, run_share, run_shared, share_count
from quantpipe.execution import InProcess, LocalPool, RayPool, plan_shards
from quantpipe.fallback import accuracy_fallback
from quantpipe.sensitivity import layer_sensitivity
from tests.conftest import EXAMPLE_MODEL
from tests.unit.execution import helpers

#: The budget keeps several of the digits CNN's layers in float, over several greedy steps.
BUDGET = {"metric": "cosine", "target": 0.99999}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(calibration Dataset, evaluation Dataset, entropy amax) of the bundled example."""
    return helpers.digits_entropy(tmp_path_factory.mktemp("cal"))


def _searches(executor, digits, out):
    calib, evald, amax = digits
    rows = layer_sensitivity(EXAMPLE_MODEL, None, amax, evald, batch_size=16, executor=executor)
    rep, fb = accuracy_fallback(EXAMPLE_MODEL, amax, calib, batch_size=16, max_samples=64, out_path=out,
                                executor=executor, **BUDGET)  # type: ignore[arg-type]
    return rows, fb, rep.quantized_nodes, out.read_bytes()


@pytest.fixture(scope="module")
def one_process(digits, tmp_path_factory):
    got = _searches(InProcess(), digits, tmp_path_factory.mktemp("w1") / "int8.onnx")
    rows, fb, _, _ = got
    assert len(fb.steps) >= 3, "the budget must take several greedy steps to test their order"
    assert sum(r.output_metric is not None for r in rows) >= 5
    return got


def _assert_same(got, expected):
    rows, fb, nodes, data = got
    assert rows == expected[0]  # every node, metric and number, in the same order
    assert fb == expected[1]  # the same layers kept, in the same order, the same metric at every step
    assert nodes == expected[2]
    assert data == expected[3]  # the same Q/DQ model, byte for byte


def test_searches_on_2_local_workers_equal_one_process(digits, one_process, tmp_path):
    with LocalPool(2, min_shard_mb=0) as pool:  # 0: every step's candidates shared out, however small
        got = _searches(pool, digits, tmp_path / "int8.onnx")
        assert pool.started, "the candidates must have run on the workers"
    _assert_same(got, one_process)


def test_searches_on_ray_equal_one_process(ray_cluster, digits, one_process, tmp_path):
    _assert_same(_searches(RayPool(2, min_shard_mb=0), digits, tmp_path / "int8.onnx"), one_process)


def test_shares_come_back_in_order(digits):
    """Uneven shares (5 candidates on 3 workers) return each candidate's output where it was asked for."""
    _, evald, amax = digits
    from quantpipe.quantize.options import QuantizeOptions
    from quantpipe.reference import prepare_reference

    ctx = prepare_reference(EXAMPLE_MODEL, amax, evald, output=None, batch_size=16, max_samples=32,
                            options=QuantizeOptions(), calibration_data=None)
    names = [n.name for n in ctx.model.graph.node if n.op_type in ("Conv", "Gemm")][:5]
    share = CandidateShare(ctx.model, amax, ctx.options, tuple({"only_nodes": frozenset({n})} for n in names),
                           FP32_BASE, tuple(ctx.feeds), ctx.output)
    alone = run_share(share)
    with LocalPool(3, min_shard_mb=0) as pool:
        shared = run_shared(pool, share)
    assert len(shared) == len(alone) == 5
    for a, b in zip(alone, shared, strict=True):
        assert a.tobytes() == b.tobytes()
    assert len({a.tobytes() for a in alone}) > 1  # the candidates differ, so the order is tested


def test_small_work_stays_in_process(digits, tmp_path):
    """With the default min_shard_mb, the bundled example's calibration and searches start no pool."""
    calib, evald, amax = digits
    with LocalPool(2) as pool:
        calibrate(EXAMPLE_MODEL, calib, methods=["entropy"], out_dir=tmp_path, executor=pool)
        layer_sensitivity(EXAMPLE_MODEL, None, amax, evald, batch_size=16, max_samples=32, executor=pool)
        assert not pool.started


def test_plan_shards_weighs_the_work_before_the_workers():
    class Counting:
        engine, min_shard_mb, asked = "ray", 100.0, 0

        @property
        def workers(self) -> int:
            self.asked += 1
            return 4

    ex = Counting()
    assert plan_shards(ex, items=10, work_mb=150.0) == 1 and ex.asked == 0  # never asks (starting Ray) for small work
    assert plan_shards(ex, items=10, work_mb=250.0) == 2
    assert plan_shards(ex, items=10, work_mb=1e6) == 4
    assert plan_shards(ex, items=3, work_mb=1e6) == 3
    assert plan_shards(ex, items=1, work_mb=1e6) == 1
    assert plan_shards(None, items=10, work_mb=1e6) == 1
    ex.min_shard_mb = 0.0
    assert plan_shards(ex, items=10, work_mb=0.0) == 4


def test_share_count_counts_candidates_samples_and_model_size(digits):
    import numpy as np

    feeds = [{"x": np.zeros((8, 3))}, {"x": np.zeros((4, 3))}]

    class Pool:
        engine, min_shard_mb, workers = "local", 10.0, 8

    model = b"\0" * 1_000_000  # 1 MB
    assert share_count(Pool(), 2, feeds, model) == 2  # 2 x 12 x 1 MB = 24 MB: two shares of >= 10
    assert share_count(Pool(), 1, feeds, model) == 1
    assert share_count(Pool(), 40, feeds, model) == 8


@pytest.fixture(scope="module")
def ranges_case(digits, tmp_path_factory):
    """The digits CNN with every method's table (what `calibration.use: auto` chooses among)."""
    from quantpipe.calibration import method_tables
    from quantpipe.onnxgraph import load_onnx
    from quantpipe.quantize.range_search import AUTO_CANDIDATES

    calib, _, _ = digits
    out = tmp_path_factory.mktemp("auto")
    summaries = calibrate(EXAMPLE_MODEL, calib, methods=["entropy", "minmax", "percentile", "mse"], out_dir=out)
    tables = method_tables(out, [*AUTO_CANDIDATES, "best"], summaries, percentile=99.99)
    return load_onnx(EXAMPLE_MODEL), tables, calib


def _ranges_and_splits(executor, ranges_case):
    from quantpipe.quantize.options import QuantizeOptions
    from quantpipe.quantize.range_search import choose_ranges
    from quantpipe.quantize.split_search import choose_splits

    model, tables, calib = ranges_case
    got = choose_ranges(model, tables, QuantizeOptions(), calib, batch_size=8, executor=executor)
    # minmax with the splittable ReLU outputs' ranges 16x too wide (no shift), so their rounding dominates; no SQNR
    # bar and any gain kept: the 2- and 4-piece trials of both run, one after the other.
    relus = ("/features/features.0/features.0.2/Relu_output_0", "/features/features.2/conv1/conv1.2/Relu_output_0")
    coarse = {t: a * (16.0 if t in relus else 1.0) for t, a in tables["minmax"].items()}
    splits = choose_splits(model, coarse, QuantizeOptions(shift_nonnegative=False), calib, batch_size=8,
                           max_sqnr_db=1e9, min_gain_db=-1e9, executor=executor)
    return got.amax, got.winner, got.model_db, got.per_tensor, splits


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_auto_ranges_and_split_choice_on_workers_equal_one_process(engine, ranges_case, request):
    expected = _ranges_and_splits(InProcess(), ranges_case)
    assert len(expected[3]) >= 2 and len(expected[4]) == 2, "the case must search several tensors and split two"
    if engine == "ray":
        request.getfixturevalue("ray_cluster")
        got = _ranges_and_splits(RayPool(2, min_shard_mb=0), ranges_case)
    else:
        with LocalPool(2, min_shard_mb=0) as pool:
            got = _ranges_and_splits(pool, ranges_case)
            assert pool.started
    assert got == expected
    assert list(got[3]) == list(expected[3])  # the per-tensor record in the same order (auto_ranges.json)
