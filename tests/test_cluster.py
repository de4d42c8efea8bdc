"""The cluster path as a user runs it: `ray start --head` (and a second node), then
`ray job submit --working-dir .` from this checkout (the session's cluster, tests/cluster.py)."""
import pandas as pd
from cluster import submit


def test_ray_job_submit_runs_the_demo_campaign_from_the_checkout(two_nodes, tmp_path):
    out = tmp_path / "results"
    result = submit(two_nodes, "run", "--images", "500", "--layers", "0-2", "--out", str(out), "--name", "job")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    assert "[campaign] storage probe: all 2 nodes of the Ray cluster write" in result.stdout  # a folder both nodes share
    assert "Layer #1: " in result.stdout  # the per-layer table in the seed's form
    trials = pd.read_parquet(out / "job" / "trials.parquet")
    assert len(trials) == 3 + 2  # neuron sites 0,1,2 + weight sites 1,2, random bit, one seed
    assert (trials["images"] == 500).all() and (trials["model"] == "demo:vgg").all()
