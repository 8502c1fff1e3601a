"""The executors for real: ordered results, errors raised as themselves, worker logs reaching the lead, a
worker that dies retried and one that keeps dying reported (never a partial result)."""

from __future__ import annotations

import logging
import os
import time

import pytest

from quantpipe.config import ExecutionConfig
from quantpipe.errors import DataError, WorkerError
from quantpipe.execution import InProcess, LocalPool, RayPool, make_executor, share_threads
from tests.unit.execution import helpers


@pytest.fixture(scope="module")
def pool():
    with LocalPool(2, retries=1) as p:
        yield p


def test_workers_1_is_in_process():
    ex = make_executor(ExecutionConfig(workers=1))
    assert isinstance(ex, InProcess) and ex.threads_per_worker is None
    seen = []
    assert ex.map(helpers.square, [3, 1, 2], on_result=lambda i, r: seen.append((i, r))) == [9, 1, 4]
    assert seen == [(0, 9), (1, 1), (2, 4)]
    assert isinstance(make_executor(ExecutionConfig(workers=3)), LocalPool)
    assert isinstance(make_executor(ExecutionConfig(engine="ray", workers=2)), RayPool)  # nothing starts yet


def test_fewer_shares_than_workers_get_the_idle_workers_cores(monkeypatch):
    """2 shares on 16 cores ran on one thread each while 14 cores idled (the sensitivity's SQNR runs of 63 images)."""
    import quantpipe.execution.base as base
    import quantpipe.execution.local as local

    for mod in (base, local):
        monkeypatch.setattr(mod, "usable_cores", lambda: 16)
    pool = LocalPool(16)  # nothing starts until a map
    assert pool.threads_per_worker == 1
    assert [share_threads(pool, n) for n in (1, 2, 3, 8, 16, 40)] == [16, 8, 5, 2, 1, 1]
    assert share_threads(InProcess(), 2) is None  # onnxruntime's default: every core
    gpu = LocalPool(4, gpu_ids=("0", "1", "2", "3"))
    assert share_threads(gpu, 1) == gpu.threads_per_worker  # a GPU worker's work is on its GPU
    ray = RayPool(2, min_shard_mb=0)
    monkeypatch.setattr(RayPool, "threads_per_worker", property(lambda self: 1))
    assert share_threads(ray, 1) == 1  # a Ray task holds the CPUs it asked for


def test_results_come_back_in_order(pool, tmp_path):
    seen = []
    items = [(i, str(tmp_path)) for i in range(5)]
    assert pool.map(helpers.slow_first, items, on_result=lambda i, r: seen.append(i)) == list(range(5))
    assert sorted(seen) == list(range(5)) and seen[-1] == 0  # finished last, still first in the results
    assert pool.threads_per_worker >= 1


def test_a_worker_error_is_raised_as_itself(pool):
    with pytest.raises(DataError, match="sample 2 is broken"):
        pool.map(helpers.bad_data, list(range(4)))
    assert pool.map(helpers.square, [4]) == [16]  # the pool starts again for the next work


def test_worker_logs_reach_the_lead_with_the_worker_named(pool, caplog):
    with caplog.at_level(logging.WARNING, logger="quantpipe"):
        pids = pool.map(helpers.logs, [0, 1, 2, 3])
        # Records travel through a queue that the lead drains on its own thread: wait for them (not a timing test).
        for _ in range(100):
            lines = [r.getMessage() for r in caplog.records if "hello from item" in r.getMessage()]
            if len(lines) >= 4:
                break
            time.sleep(0.1)
    assert os.getpid() not in pids
    assert sorted(int(m.rsplit(" ", 1)[1]) for m in lines) == [0, 1, 2, 3]
    assert all(m.startswith("[worker ") for m in lines), lines


def test_a_dead_worker_is_retried(pool, tmp_path):
    marker = str(tmp_path / "died-once")
    assert pool.map(helpers.die_once, [marker]) == ["survived"]
    assert os.path.exists(marker)


def test_a_worker_that_keeps_dying_is_an_error_not_a_partial_result(tmp_path):
    with LocalPool(2, retries=1) as p, pytest.raises(WorkerError, match="died 2 times.*partial set of shards"):
        p.map(helpers.die_always, ["a", "b"])


def test_ray_runs_the_same_work(ray_cluster, tmp_path):
    ex = RayPool(2, retries=1)
    assert ex.map(helpers.slow_first, list(range(5))) == list(range(5))
    with pytest.raises(DataError, match="sample 2 is broken"):
        ex.map(helpers.bad_data, list(range(4)))
    marker = str(tmp_path / "ray-died-once")
    # Ray's max_retries runs it again; a few retries, since a worker started on a loaded machine can fail on its own
    assert RayPool(2, retries=3).map(helpers.die_once, [marker]) == ["survived"]
    with pytest.raises(WorkerError, match="partial set of shards"):
        ex.map(helpers.die_always, ["a"])
    ex.close()
    assert ray_cluster.is_initialized()  # an instance the executor did not start is left running
    default = make_executor(ExecutionConfig(engine="ray"))
    assert (default.workers, default.threads_per_worker, default.gpus) == (2, 1, 0)  # the cluster's 2 CPUs


def test_each_local_worker_gets_one_gpu_and_its_share_of_the_threads():
    with LocalPool(2, gpu_ids=["3", "5"]) as p:
        seen = p.map(helpers.my_gpu, list(range(8)))
    by_pid: dict[int, set[str | None]] = {}
    for pid, gpu, threads in seen:
        by_pid.setdefault(pid, set()).add(gpu)
        assert threads == str(p.threads_per_worker)
    assert all(len(g) == 1 for g in by_pid.values()), by_pid  # a worker keeps its GPU
    assert set().union(*by_pid.values()) <= {"3", "5"}
    if len(by_pid) == 2:  # both workers took work: they hold different GPUs
        assert set().union(*by_pid.values()) == {"3", "5"}


def test_an_error_in_one_share_stops_the_others(tmp_path):
    # Before, a share still running held the command at exit until it ended (290 s on DeepLabV3, found probing).
    started = time.monotonic()
    with LocalPool(2, retries=0) as p, pytest.raises(DataError, match="sample 0 is broken"):
        p.map(helpers.fail_or_linger, [(0, str(tmp_path)), (1, str(tmp_path))])
    assert time.monotonic() - started < 45  # the other share sleeps 60 s
    for pid_file in tmp_path.glob("*.pid"):
        pid = int(pid_file.read_text())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"worker {pid} still runs")
