"""The trial function without Ray: windows, early stopping, idempotent files."""
import json

import pandas as pd
import pytest

from trainables.results import finished_keys
from trainables.trial import CampaignSettings, TrialPoint, run_trial


def settings(tmp_path, **changes):
    values = dict(name="t", directory=str(tmp_path), model="demo:vgg", dataset="fashion-mnist", images=2000,
                  report_every=500, record="changed")
    return CampaignSettings(**{**values, **changes})


def test_target_margin_stops_at_a_window_boundary_whatever_the_batch_size(tmp_path):
    reports = []
    rows = [run_trial(settings(tmp_path / str(bs), batch_size=bs, target_margin=0.03), TrialPoint("neuron", 16, 30, 3),
                      report=reports.append) for bs in (64, 300)]
    for row in rows:
        assert row["stopped_early"] and row["images"] == 1000  # half-width 0.036 after window 1, 0.025 after 2
        assert (row["ci_high"] - row["ci_low"]) / 2 < 0.03
    assert rows[0]["mismatches"] == rows[1]["mismatches"] and rows[0]["golden_correct"] == rows[1]["golden_correct"]
    assert [r["images"] for r in reports] == [500, 1000, 500, 1000]
    assert reports[1]["misclassification_rate"] == rows[0]["misclassification_rate"]


def test_without_margin_every_image_runs_and_reports_are_running_counts(tmp_path):
    reports = []
    row = run_trial(settings(tmp_path), TrialPoint("weight", 1, "random", 3), report=reports.append)
    assert not row["stopped_early"] and row["images"] == 2000
    assert [r["images"] for r in reports] == [500, 1000, 1500, 2000]
    assert reports[-1]["mismatches"] == row["mismatches"] and row["images_per_weight_fault"] == 256
    marker = json.loads((tmp_path / "parts" / "done" / f"{row['trial_key']}.json").read_text())
    assert "commit" not in reports[-2] and json.loads(reports[-1]["commit"]) == marker["files"]  # the last, once committed
    assert sorted(marker["files"]) == [f"{folder}/{row['trial_key']}.parquet" for folder in ("faults", "parts/bits", "parts/trials")]


def test_rerun_replaces_the_trial_files_instead_of_duplicating(tmp_path):
    point = TrialPoint("neuron", 0, 30, 9)
    first = run_trial(settings(tmp_path), point)
    run_trial(settings(tmp_path), point)
    assert finished_keys(tmp_path) == {point.key}
    faults = pd.read_parquet(tmp_path / "faults")
    assert len(faults) == first["changed"] > 0 and not faults.duplicated(["trial_key", "image"]).any()
    assert list(tmp_path.rglob("*.tmp")) == []


def test_unknown_site_and_bad_bit_are_refused(tmp_path):
    with pytest.raises(ValueError, match="site 99 does not exist"):
        run_trial(settings(tmp_path), TrialPoint("neuron", 99, 1, 1))
    with pytest.raises(ValueError, match=r"allowed 0\.\.31"):
        run_trial(settings(tmp_path), TrialPoint("neuron", 1, 40, 1))
    assert finished_keys(tmp_path) == set()
