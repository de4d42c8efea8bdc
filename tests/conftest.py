"""Session fixtures: one local Ray cluster on loopback for every campaign test."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_address():
    """Start one local Ray cluster (2 CPUs, 2 logical GPUs, no dashboard) for the session;
    return its GCS address so subprocess drivers can join it."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, _temp_dir=temp_dir,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}},
             logging_level="WARNING", configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


_TWO_NODES: dict = {}  # the session's two-node cluster, once started


def pytest_collection_finish(session):
    """Boot the two-node cluster in the background as soon as a selected test needs it, so
    that it comes up while the tests before it run."""
    if any("two_nodes" in getattr(item, "fixturenames", ()) for item in session.items):
        from cluster import start_two_nodes

        _TWO_NODES.update(start_two_nodes())


def pytest_sessionfinish(session, exitstatus):
    if _TWO_NODES:
        from cluster import stop

        stop(_TWO_NODES["processes"], _TWO_NODES["temps"])
        for temp in _TWO_NODES["temps"]:
            shutil.rmtree(temp, ignore_errors=True)
        _TWO_NODES.clear()


@pytest.fixture(scope="session")
def two_nodes():
    """A head node (with the job API) and a second node, 1 CPU each, both alive (tests/cluster.py)."""
    from cluster import start_two_nodes, wait_two_nodes

    if not _TWO_NODES:
        _TWO_NODES.update(start_two_nodes())
    return wait_two_nodes(_TWO_NODES)
