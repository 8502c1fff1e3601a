"""One real local Ray cluster per test session (2 CPUs, loopback only, no dashboard), or a skip saying why."""

from __future__ import annotations

import importlib.util
import os

import pytest

from quantpipe.execution.ray_engine import LOOPBACK_ENV


@pytest.fixture(scope="session")
def ray_cluster():
    """The `ray` module, initialised on a local cluster bound to 127.0.0.1; shut down after the session."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed, so the Ray engine cannot be tested here: pip install 'quantpipe[ray]'")
    # Before ray is first imported: a local instance is advertised on (and bound to) 127.0.0.1, never the network.
    os.environ[LOOPBACK_ENV] = "0"
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process; these tests start their own")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=True)
    gcs = ray.get_runtime_context().gcs_address
    assert gcs.startswith("127.0.0.1:"), f"the test cluster must listen on loopback only, got {gcs}"
    yield ray
    ray.shutdown()
