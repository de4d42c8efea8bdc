"""The cluster path as a user runs it: `ray start --head` (and a second node), then
`ray job submit --working-dir .` from this checkout (the session's cluster, tests/cluster.py)."""
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from cluster import ROOT, kill_second_node, rejoin_second_node, submit, wait_two_nodes


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


NODE_LOSS = dict(model="demo:vgg", weights="none", images=256, batch_size=128, report_every=128, layers="0-2",
                 sites=("neuron",), bits="30", seeds=(5,), record="changed", max_failures=3, name="node-lost")
DRIVER = """import json, sys
from campaign.runner import run_campaign
from campaign.spec import CampaignSpec
outcome = run_campaign(CampaignSpec(**{**json.loads(sys.argv[1]), "sites": ("neuron",), "seeds": (5,)}), _hold=json.loads(sys.argv[2]))
print(f"complete={outcome.complete} finished={outcome.finished} errors={outcome.errors}")
"""


def test_a_worker_node_lost_mid_campaign_its_trial_runs_again_on_the_other_node_with_identical_rows(two_nodes, tmp_path):
    """Both nodes run a trial (1 CPU each), held at its first report; the second node is then
    killed (`ray start`, raylet, workers). Tune retries the lost trial on the head node and the
    rows equal the same trials run by the engine directly. A fresh second node joins afterwards."""
    from campaign.runner import settings_for
    from campaign.spec import CampaignSpec, resolve
    from trainables.results import aggregate
    from trainables.trial import CampaignSettings, TrialPoint, run_trial

    head, second = two_nodes["head_id"], two_nodes["worker_id"]
    hold = tmp_path / "hold"
    hold.mkdir()
    spec = {**NODE_LOSS, "out": str(tmp_path), "address": two_nodes["gcs"]}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(spec),
                               json.dumps({"dir": str(hold), "timeout_s": 240})],
                              cwd=ROOT, env={**two_nodes["env"], "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while len(list(hold.glob("held-*"))) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        held = {p.name: p.read_text() for p in hold.glob("held-*")}
        assert sorted(held.values()) == sorted([head, second]), (
            held, driver.poll() is not None and driver.communicate()[0].decode()[-3000:])
        lost = next(name for name, node in held.items() if node == second).rsplit("-", 1)[0][len("held-"):]
        killed = kill_second_node(two_nodes)
        (hold / "release").touch()
        output = driver.communicate(timeout=400)[0].decode()
    finally:
        if driver.poll() is None:
            driver.kill()
        rejoin_second_node(two_nodes)
        two_nodes.update(wait_two_nodes(two_nodes, lost=second))  # the fresh second node, for the tests after this one
    assert driver.returncode == 0 and "complete=True finished=3 errors=()" in output, output[-3000:]
    assert not [pid for pid in killed if Path(f"/proc/{pid}").exists()]  # the node and its workers are gone
    attempts = sorted(p.read_text() for p in hold.glob(f"held-{lost}-*"))
    assert attempts == sorted([second, head])  # lost on the second node, rerun on the head
    plan = resolve(CampaignSpec(**{**spec, "out": str(tmp_path / "oracle")}))
    settings = CampaignSettings.from_dict(settings_for(plan))
    for point in plan.trials:
        run_trial(settings, TrialPoint(**dataclasses.asdict(point)))
    aggregate(plan.directory)
    run_only = ["wall_s", "device", "started_at", "worker", "campaign"]
    for name in ("trials.parquet", "bits.parquet"):
        oracle = pd.read_parquet(Path(plan.directory) / name).drop(columns=run_only, errors="ignore")
        lost_run = pd.read_parquet(tmp_path / "node-lost" / name).drop(columns=run_only, errors="ignore")
        pd.testing.assert_frame_equal(oracle, lost_run)
    oracle, lost_run = (pd.read_parquet(Path(d) / "faults").drop(columns=["campaign"]).sort_values(["trial_key", "image"])
                        .reset_index(drop=True) for d in (plan.directory, tmp_path / "node-lost"))
    pd.testing.assert_frame_equal(oracle, lost_run)
