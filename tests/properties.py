"""Shared settings of the hypothesis property tests: reproducible in CI, bounded in time.

`derandomize=True` makes every run generate the same cases (a CI failure reproduces locally), no example
database is written, and each test states its own `max_examples`; together they give >= 10,000 cases per run.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

__all__ = ["examples"]

_BASE = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                        HealthCheck.data_too_large, HealthCheck.filter_too_much])


def examples(n: int) -> settings:
    """Property-test settings generating `n` cases."""
    return settings(_BASE, max_examples=n)
