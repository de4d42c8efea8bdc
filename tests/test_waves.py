"""Campaigns fed to Tune in waves (campaign.runner.wave_size): the same rows as one wave, Tune's
state of finished waves dropped, and a driver SIGKILLed in its second wave resumes to the same result."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from campaign.runner import run_campaign, spec_from_directory
from campaign.spec import CampaignSpec, SpecError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="demo:vgg", weights="none", images=64, batch_size=64, layers="0-2", sites=("neuron",), bits="30",
            num_seeds=2, record="all", report_every=64, cpus_per_trial=1.0)  # 3 sites x 2 seeds = 6 trials
RUN_ONLY = ["wall_s", "device", "started_at", "worker", "campaign"]  # differ between runs by nature


def frames(directory: Path):
    trials = pd.read_parquet(directory / "trials.parquet").drop(columns=RUN_ONLY)
    bits = pd.read_parquet(directory / "bits.parquet").drop(columns=["campaign"])
    faults = pd.read_parquet(directory / "faults").drop(columns=["campaign"]).sort_values(["trial_key", "image"])
    return trials, bits, faults.reset_index(drop=True)


@pytest.fixture(scope="module")
def one_wave(ray_address, tmp_path_factory):
    outcome = run_campaign(CampaignSpec(**TINY, out=str(tmp_path_factory.mktemp("one")), name="one"))
    assert outcome.complete and outcome.errored == 0 and outcome.total == 6
    return outcome


def test_several_waves_give_the_rows_of_one_and_drop_finished_waves_tune_state(one_wave, tmp_path, capsys):
    outcome = run_campaign(CampaignSpec(**TINY, out=str(tmp_path), name="waves"), wave_size=2)
    assert outcome.complete and outcome.errored == 0 and (outcome.launched, outcome.total) == (6, 6)
    assert outcome.injections == one_wave.injections == 6 * 64
    assert "in 3 waves of up to 2" in capsys.readouterr().out
    for a, b in zip(frames(one_wave.directory), frames(outcome.directory)):
        pd.testing.assert_frame_equal(a, b)
    assert sorted(p.name for p in (outcome.directory / "ray").iterdir()) == ["tune-2"]  # waves 0 and 1: dropped
    assert sorted(p.name for p in (one_wave.directory / "ray").iterdir()) == ["tune-0"]


def test_a_wave_size_that_is_not_a_positive_integer_is_refused_before_any_work(tmp_path):
    for bad in (0, -3, 2.5):
        with pytest.raises(SpecError, match=r"^wave_size: must be a positive integer, got "):
            run_campaign(CampaignSpec(**TINY, out=str(tmp_path), name="bad"), wave_size=bad)
    assert list(tmp_path.iterdir()) == []


def test_a_driver_killed_in_its_second_wave_resumes_to_the_rows_of_one_wave(one_wave, ray_address, tmp_path):
    """Waves of 3, one trial at a time: SIGKILL once 4 trials have committed (the second wave runs)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    args = [sys.executable, "-m", "campaign", "run", "--model", "demo:vgg", "--weights", "none", "--images", "64",
            "--batch-size", "64", "--layers", "0-2", "--sites", "neuron", "--bits", "30", "--num-seeds", "2",
            "--record", "all", "--report-every", "64", "--max-concurrent", "1", "--wave-size", "3",
            "--address", ray_address, "--out", str(tmp_path), "--name", "killed"]
    directory = tmp_path / "killed"
    driver = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and driver.poll() is None:
        if len(list((directory / "parts" / "done").glob("*.json"))) >= 4:
            driver.send_signal(signal.SIGKILL)
            break
        time.sleep(0.1)
    output = driver.communicate(timeout=120)[0].decode()
    done_then = len(list((directory / "parts" / "done").glob("*.json")))
    # tiny trials: the killed driver's orphaned worker may still commit one or two more before it is stopped
    assert driver.returncode == -signal.SIGKILL and 4 <= done_then <= 6, output
    assert "in 2 waves of up to 3" in output
    outcome = run_campaign(spec_from_directory(directory))
    # a trial running at the kill may still commit afterwards (its worker outlives the driver a moment)
    assert outcome.complete and outcome.errored == 0 and outcome.launched <= 6 - done_then
    for a, b in zip(frames(one_wave.directory), frames(outcome.directory)):
        pd.testing.assert_frame_equal(a, b)
