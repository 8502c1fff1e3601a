"""How a search step's candidates are cut into shares (`candidates.split` / `join`), the worker-side cache of
what every share reads (`execution.stash`), and that shares cut into sample slices give one process's outputs
exactly: with local workers, on a real Ray cluster, and through whole sensitivity and fallback searches when
there are more workers than candidates."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantpipe.candidates import FP32_BASE, CandidateShare, join, run_share, run_shared, share_count, split
from quantpipe.data import open_dataset
from quantpipe.errors import WorkerError
from quantpipe.execution import InProcess, LocalPool, RayPool
from quantpipe.execution.stash import Stashed, cached_digests, pack, stash_file, unstash
from quantpipe.model import load_model_spec
from tests.conftest import EXAMPLE_CALIB, EXAMPLE_EVAL, EXAMPLE_MODEL
from tests.unit.execution import helpers


@given(st.integers(1, 40), st.integers(1, 12), st.integers(1, 64))
def test_split_covers_every_candidate_and_batch_once_in_order(candidates, batches, shares):
    plan = split(candidates, batches, shares)
    seen = [(c, b) for cands, (lo, hi) in plan for c in cands for b in range(lo, hi)]
    assert sorted(seen) == [(c, b) for c in range(candidates) for b in range(batches)]  # each exactly once
    assert all(cands and hi > lo for cands, (lo, hi) in plan)  # no empty share
    if shares <= candidates:  # every candidate over all batches, the candidates dealt out in turn
        assert len(plan) == max(1, shares)
        assert all(span == (0, batches) for _, span in plan)
        assert max(len(c) for c, _ in plan) - min(len(c) for c, _ in plan) <= 1
    else:  # one candidate per share, its slices in batch order, enough of them to fill the shares (or every batch)
        assert all(len(c) == 1 for c, _ in plan)
        slices = len(plan) // candidates

        def finish(s: int) -> float:  # rounds of `shares` at once, times a slice's length (in whole candidates)
            return -(-candidates * s // shares) / s

        assert len(plan) == candidates * slices
        assert finish(slices) == min(finish(s) for s in range(1, batches + 1))  # ends soonest
        assert all(finish(s) > finish(slices) for s in range(1, slices))  # with the fewest slices that do
        for c in range(candidates):
            spans = [span for cands, span in plan if cands == (c,)]
            assert spans == sorted(spans) and spans[0][0] == 0 and spans[-1][1] == batches


def test_join_puts_slices_back_in_order_and_refuses_a_missing_piece():
    plan = split(2, 4, 5)  # 2 candidates, 3 slices each... (5 shares wanted)
    data = {c: np.arange(8 * (c + 1)).reshape(-1, 2)[: 8] + 100 * c for c in range(2)}  # 4 batches of 2 rows
    parts = [[data[cands[0]][2 * lo:2 * hi]] for cands, (lo, hi) in plan]
    got = join(plan, parts, 2)
    assert [g.tobytes() for g in got] == [data[0].tobytes(), data[1].tobytes()]
    with pytest.raises(WorkerError, match="no choice is made on part"):
        join(plan, [*parts[:-1], []], 2)


def test_share_count_cuts_into_sample_slices_when_workers_outnumber_candidates():
    feeds = [{"x": np.zeros((8, 3))} for _ in range(4)]

    class Pool:
        engine, min_shard_mb, workers = "local", 0.0, 16

    assert share_count(Pool(), 12, feeds, b"\0" * 1000) == 16  # 12 candidates x 4 batches: every worker
    assert share_count(Pool(), 2, feeds, b"\0" * 1000) == 8  # 2 x 4 (candidate, batch) pieces at most
    assert share_count(Pool(), 1, feeds, b"\0" * 1000) == 1  # one candidate stays in this process
    assert len(split(12, 4, 16)) == 48  # 12 candidates in quarters: 3 rounds of a quarter on 16 workers
    assert len(split(12, 2, 16)) == 12  # in halves, 24 shares would take as long as 12 whole candidates


def test_stash_is_verified_and_kept(tmp_path):
    value = {"w": np.arange(5.0)}
    data, digest = pack(value)
    handle = stash_file(tmp_path, data, digest)
    assert Path(handle.where).read_bytes() == data and handle.size == len(data)
    got = unstash(handle)
    assert got["w"].tobytes() == value["w"].tobytes() and digest in cached_digests()
    assert unstash(handle) is got  # from the cache, not read again
    # A stale or damaged copy under the same name is refused, never trusted.
    other_data, other = pack({"w": np.arange(6.0)})
    Path(tmp_path / f"{other}.pkl").write_bytes(data)  # the wrong content under the other digest's name
    with pytest.raises(WorkerError, match="stale or damaged"):
        unstash(Stashed(digest=other, kind="file", where=str(tmp_path / f"{other}.pkl"), size=len(other_data)))
    assert other not in cached_digests()
    assert InProcess().stash(value).value is value  # one process: nothing pickled, nothing written


def test_local_workers_read_a_stashed_value_once(tmp_path):
    with LocalPool(2, min_shard_mb=0) as pool:
        handle = pool.stash(np.arange(1000.0))
        assert pool.stash(np.arange(1000.0)) == handle  # the same content: one file
        folder = Path(handle.where).parent
        results = pool.map(helpers.stash_seen, [handle] * 8)
        assert all(v.tobytes() == np.arange(1000.0).tobytes() for _, _, v in results)
        by_worker: dict[int, list[bool]] = {}
        for pid, before, _ in results:
            by_worker.setdefault(pid, []).append(before)
        assert all(seen.count(False) == 1 for seen in by_worker.values())  # each worker read it once
        assert sum(len(s) for s in by_worker.values()) == 8
    assert not folder.exists()  # close removes the pool's stash folder


@pytest.fixture(scope="module")
def slices_case(tmp_path_factory):
    """A share of 3 one-layer candidates over 4 batches of the bundled example, and one process's outputs."""
    from quantpipe.quantize.options import QuantizeOptions
    from quantpipe.reference import prepare_reference

    _, evald, amax = helpers.digits_entropy(tmp_path_factory.mktemp("cal"))
    ctx = prepare_reference(EXAMPLE_MODEL, amax, evald, output=None, batch_size=8, max_samples=32,
                            options=QuantizeOptions(), calibration_data=None)
    names = [n.name for n in ctx.model.graph.node if n.op_type in ("Conv", "Gemm")][:3]
    share = CandidateShare(ctx.model, amax, ctx.options, tuple({"only_nodes": frozenset({n})} for n in names),
                           FP32_BASE, tuple(ctx.feeds), ctx.output)
    assert len(share.feeds) == 4
    alone = run_share(share)
    assert len({a.tobytes() for a in alone}) == 3  # the candidates differ, so order is tested
    return share, alone


def _assert_same(got, alone):
    assert len(got) == len(alone)
    for a, b in zip(alone, got, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_sample_slices_on_local_workers_equal_one_process(slices_case):
    share, alone = slices_case
    with LocalPool(2, min_shard_mb=0) as pool:
        _assert_same(run_shared(pool, share, shares=6), alone)  # 3 candidates x 2 slices of 2 batches
        _assert_same(run_shared(pool, share, shares=12), alone)  # 3 x 4 slices of one batch each
        _assert_same(run_shared(pool, share, shares=2), alone)  # candidates dealt out: (0, 2) and (1,)


def test_sample_slices_on_ray_equal_one_process(ray_cluster, slices_case):
    share, alone = slices_case
    pool = RayPool(2, min_shard_mb=0)
    _assert_same(run_shared(pool, share, shares=12), alone)
    _assert_same(run_shared(pool, share, shares=2), alone)
    pool.close()


class Wide:
    """16 workers as the stages see them (more than any step of the digits CNN has candidates), run by a real
    pool of 2 processes: every step's candidates are cut into sample slices."""

    engine, min_shard_mb, workers, gpus, threads_per_worker = "local", 0.0, 16, 0, 1

    def __init__(self, pool: LocalPool) -> None:
        self.pool = pool

    def map(self, fn, items, *, on_result=None):
        return self.pool.map(fn, items, on_result=on_result)

    def stash(self, value):
        return self.pool.stash(value)

    def close(self) -> None:
        self.pool.close()


def test_searches_with_more_workers_than_candidates_equal_one_process(tmp_path):
    """The sensitivity and an 8-step fallback with every step's candidates cut into sample slices."""
    from quantpipe.calibration import calibrate, select_amax
    from quantpipe.fallback import accuracy_fallback
    from quantpipe.sensitivity import layer_sensitivity

    spec, _ = load_model_spec(EXAMPLE_MODEL)
    calib = open_dataset(EXAMPLE_CALIB, spec.inputs)
    evald = open_dataset(EXAMPLE_EVAL, spec.inputs, labels_key="label", role="evaluation")
    amax = select_amax(tmp_path, "entropy", calibrate(EXAMPLE_MODEL, calib, methods=["entropy"], out_dir=tmp_path))

    def searches(executor, out):
        rows = layer_sensitivity(EXAMPLE_MODEL, None, amax, evald, batch_size=8, max_samples=32, executor=executor)
        rep, fb = accuracy_fallback(EXAMPLE_MODEL, amax, calib, batch_size=8, max_samples=32, out_path=out,
                                    executor=executor, metric="cosine", target=0.99999)
        return rows, fb, out.read_bytes()

    expected = searches(InProcess(), tmp_path / "one.onnx")
    assert len(expected[1].steps) >= 2
    with LocalPool(2, min_shard_mb=0) as pool:
        got = searches(Wide(pool), tmp_path / "wide.onnx")
        assert pool.started
    assert got == expected


def test_a_share_job_pickles_small(slices_case):
    """What travels per share is the handles and the share's candidates, not the model or the samples."""
    share, _ = slices_case
    with LocalPool(2, min_shard_mb=0) as pool:
        model = pool.stash(share.model)
        from quantpipe.candidates import ShareJob

        job = ShareJob(model, pool.stash((share.amax, share.options)), pool.stash(tuple(share.feeds)), share.base,
                       share.output, share.changes[:1], (0, 2), 1, 0)
        assert len(pickle.dumps(job)) < 4096 < model.size


def test_stash_book_pickles_a_value_once_and_a_content_once(monkeypatch):
    from quantpipe.execution import stash as stash_module

    packed: list[int] = []
    real_pack = stash_module.pack
    monkeypatch.setattr(stash_module, "pack", lambda v: (packed.append(1), real_pack(v))[1])
    puts: list[str] = []

    def put(data: bytes, digest: str) -> Stashed:
        puts.append(digest)
        return Stashed(digest=digest, kind="inline", value=pickle.loads(data))

    book = stash_module.StashBook()
    model, feeds = np.arange(10.0), [{"x": np.ones(3)}, {"x": np.zeros(3)}]
    first = book.stash(model, put)
    assert book.stash(model, put) is first and len(packed) == 1  # the same object: not pickled again
    assert book.stash(tuple(feeds), put) is book.stash(tuple(feeds), put)  # a fresh tuple of the same samples
    assert len(packed) == 2
    assert book.stash(np.arange(10.0), put) is first and len(packed) == 3  # equal content, another object: one put
    assert len(puts) == 2
    book.clear()
    assert book.stash(model, put).digest == first.digest and len(puts) == 3
