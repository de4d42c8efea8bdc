"""Campaigns on a real local Ray cluster: results equal the engine's, GPU placement,
worker-crash retries, resume after SIGKILL / Ctrl-C of the driver."""
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import analysis
from analysis import report
from campaign import cli, interrupts
from campaign.cli import _finish
from campaign.runner import CampaignInterrupted, run_campaign, spec_from_directory
from campaign.spec import CampaignSpec
from trainables.trial import CampaignSettings, TrialPoint, run_trial

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(model="demo:vgg", weights="none", images=600, layers="0-2,5", bits="random,30", report_every=256,
             record="all", cpus_per_trial=1.0)
RUN_ONLY = ["wall_s", "device", "started_at", "worker"]  # differ between runs by nature


def result_frames(directory: Path):
    trials = pd.read_parquet(directory / "trials.parquet").drop(columns=RUN_ONLY + ["campaign"])
    faults = pd.read_parquet(directory / "faults").drop(columns=["campaign"])
    faults = faults.sort_values(["trial_key", "image"]).reset_index(drop=True)
    bits = pd.read_parquet(directory / "bits.parquet").drop(columns=["campaign"])
    return trials.reset_index(drop=True), faults, bits.reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(ray_address, tmp_path_factory):
    """An uninterrupted run of the SMALL campaign."""
    out = tmp_path_factory.mktemp("ref")
    outcome = run_campaign(CampaignSpec(**SMALL, out=str(out), name="ref"))
    assert outcome.complete and outcome.errored == 0
    return outcome


def test_campaign_rows_equal_the_engine_run_directly(reference, tmp_path):
    trials, faults, bits = result_frames(reference.directory)
    assert len(trials) == reference.total == 2 * (4 + 3)  # bits x (neuron sites 0,1,2,5 + weight sites 1,2,5)
    assert trials["images"].eq(600).all() and not trials["trial_key"].duplicated().any()
    assert set(trials["kind"]) == {"neuron", "weight"} and (trials["mode"] == "fp32").all()
    assert len(faults) == 600 * len(trials)  # record=all
    row = trials[trials["trial_key"] == "neuron-s0005-b30-seed" + str(trials["seed"].iloc[0])].iloc[0]
    settings = CampaignSettings(name="direct", directory=str(tmp_path), model="demo:vgg", dataset="fashion-mnist",
                                weights="none", images=600, report_every=256, record="all")
    direct = run_trial(settings, TrialPoint("neuron", 5, 30, int(row["seed"])))
    for column in ("images", "golden_correct", "mismatches", "changed", "nonfinite", "misclassification_rate", "ci_low", "ci_high"):
        assert direct[column] == row[column], column
    per_bit = bits[bits["trial_key"] == row["trial_key"]]
    assert per_bit["bit"].tolist() == [30] and int(per_bit["mismatches"].iloc[0]) == row["mismatches"]
    random_bits = bits[bits["trial_key"].str.contains("brandom")].groupby("trial_key")["images"].sum()
    assert (random_bits == 600).all()
    spec_json = (reference.directory / "spec.json").read_text()
    assert '"torch"' in spec_json and '"ray"' in spec_json and '"pytorchfi"' in spec_json


def test_rerun_of_a_finished_campaign_launches_nothing_and_changes_nothing(reference, capsys, monkeypatch):
    before = result_frames(reference.directory)
    table = "\n".join(analysis.seed_layer_lines(analysis.per_site(analysis.load(reference.directory))))
    outcome = run_campaign(spec_from_directory(reference.directory))
    assert outcome.complete and outcome.finished == reference.total
    assert outcome.launched == 0 and outcome.injections == 0 and reference.launched == reference.total
    capsys.readouterr()
    # a plain campaign's table comes from rows pooled batch by batch (bounded memory), never the whole frame
    monkeypatch.setattr(analysis, "load", lambda *a, **k: pytest.fail("the whole trials frame was loaded"))
    assert _finish(outcome) == 0
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert out.startswith("\n" + table + "\n") and "Layer #" in table
    assert f"nothing left to run: {reference.total}/{reference.total} trials were already finished" in out
    after = result_frames(reference.directory)
    for a, b in zip(before, after):
        pd.testing.assert_frame_equal(a, b)


def test_different_campaign_in_same_directory_is_refused(reference):
    from campaign.spec import SpecError

    with pytest.raises(SpecError, match="holds a different campaign.*bits"):
        run_campaign(CampaignSpec(**{**SMALL, "bits": "31"}, out=str(reference.directory.parent), name="ref"))


def test_fractional_gpus_run_four_trials_at_a_time_on_their_assigned_devices(ray_address, tmp_path):
    """0.5 CPU + 0.5 GPU per trial on 2 CPUs + 2 GPUs: the first four trials to start must all be
    placed at once (they wait for each other at a barrier), two on each logical GPU."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    spec = CampaignSpec(model="demo:vgg", weights="none", images=500, layers="0-5", sites=("neuron",), bits="30",
                        record="none", cpus_per_trial=0.5, gpus_per_trial=0.5, out=str(tmp_path), name="gpus")
    outcome = run_campaign(spec, _barrier={"dir": str(barrier), "parties": 4, "timeout_s": 120})
    assert outcome.complete and outcome.finished == 6
    trials = pd.read_parquet(outcome.directory / "trials.parquet")
    assert trials["device"].str.fullmatch(r"cpu \(CUDA absent; Ray assigned GPU [01]\)").all()
    assert sorted(p.name for p in barrier.glob("met-*")) == ["met-0", "met-1", "met-2", "met-3"]
    first_wave = sorted((barrier / f"slot-{i}").read_text() for i in range(4))
    assert first_wave == ["0", "0", "1", "1"]  # two trials on each GPU while all four ran
    assert sorted(p.name for p in barrier.glob("slot-*")) == [f"slot-{i}" for i in range(6)]


def test_crashed_workers_are_retried_and_results_unchanged(reference, tmp_path):
    """Two of the reference's trials (same seed and keys: neuron site 5, both bit specs), each of whose first worker dies."""
    crash_dir = tmp_path / "crashes"
    crash_dir.mkdir()
    spec = CampaignSpec(**{**SMALL, "layers": "5", "sites": ("neuron",)}, out=str(tmp_path), name="crashy", max_failures=2)
    outcome = run_campaign(spec, _crash_once_dir=str(crash_dir))
    assert outcome.complete and outcome.errored == 0 and outcome.total == 2
    crashed = sorted(p.name for p in crash_dir.iterdir())
    assert len(crashed) == outcome.total  # every trial's first worker died
    for a, b in zip(result_frames(reference.directory), result_frames(outcome.directory)):
        subset = a[a["trial_key"].isin(b["trial_key"])].reset_index(drop=True)
        assert sorted(set(subset["trial_key"])) == sorted(set(b["trial_key"])) == crashed
        pd.testing.assert_frame_equal(subset, b)


@pytest.fixture(scope="module")
def stopped(reference, ray_address, tmp_path_factory):
    """Two drivers of the SMALL campaign (one trial at a time each) run at once as
    subprocesses joining the session's cluster; once 3 trials of a driver have finished, it
    gets its signal: SIGKILL or SIGINT. Returns {signal: (campaign directory, output, exit code, trials done then)}."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    running = {}
    for sig in (signal.SIGKILL, signal.SIGINT):
        out = tmp_path_factory.mktemp(sig.name)
        args = [sys.executable, "-m", "campaign", "run", "--model", SMALL["model"], "--weights", "none", "--images", "600",
                "--layers", SMALL["layers"], "--bits", SMALL["bits"], "--report-every", "256", "--record", "all",
                "--max-concurrent", "1", "--address", ray_address, "--out", str(out), "--name", "stopped"]
        driver = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        running[sig] = (out / "stopped", driver)
    done_then = {}
    deadline = time.monotonic() + 180
    while len(done_then) < len(running) and time.monotonic() < deadline:
        for sig, (directory, driver) in running.items():
            if sig not in done_then and len(list((directory / "parts" / "trials").glob("*.parquet"))) >= 3:
                driver.send_signal(sig)
                done_then[sig] = None
        time.sleep(0.2)
    results = {}
    for sig, (directory, driver) in running.items():
        if sig not in done_then:
            driver.kill()
        output = driver.communicate(timeout=120)[0].decode()
        results[sig] = (directory, output, driver.returncode, len(list((directory / "parts" / "trials").glob("*.parquet"))))
    return results


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])  # SIGTERM: test_cli
def test_resume_after_the_driver_is_stopped_equals_an_uninterrupted_run(reference, stopped, sig):
    directory, output, returncode, done_when_stopped = stopped[sig]
    assert 3 <= done_when_stopped < reference.total, output
    if sig != signal.SIGKILL:  # our resume hint only: no Tune restore advice, no worker tracebacks, no C stack
        assert returncode == 128 + sig, output
        assert output.rstrip().endswith(f"interrupted: run `python -m campaign resume {directory}` to finish the campaign")
        for noise in ("Tuner.restore", "FileNotFoundError", "Traceback", "SIGTERM received", "WARNING"):
            assert noise not in output, output
    outcome = run_campaign(spec_from_directory(directory))
    assert outcome.complete, outcome
    for a, b in zip(result_frames(reference.directory), result_frames(outcome.directory)):
        pd.testing.assert_frame_equal(a, b)


def test_a_stop_whose_keyboard_interrupt_was_swallowed_is_raised_at_the_next_check(ray_address, tmp_path):
    """The signal handler's KeyboardInterrupt can land in a finalizer or a callback whose
    exceptions are ignored; the request it leaves (campaign.interrupts) stops the campaign at
    the next check (before a wave, at every Tune step), with nothing run and the resume hint's directory."""
    interrupts.request()
    try:
        with pytest.raises(CampaignInterrupted) as stop:
            run_campaign(CampaignSpec(**{**SMALL, "layers": "1", "bits": "30"}, out=str(tmp_path), name="asked"))
    finally:
        interrupts.clear()
    assert stop.value.directory == tmp_path / "asked"
    assert not list((tmp_path / "asked" / "parts" / "trials").glob("*.parquet"))
    outcome = run_campaign(spec_from_directory(tmp_path / "asked"))
    assert outcome.complete and outcome.launched == outcome.total == 2  # neuron and weight site 1


def test_report_command_writes_tables_csv_and_plots(reference, tmp_path, capsys):
    assert cli.main(["report", str(reference.directory), "--out", str(tmp_path)]) == 0
    result = capsys.readouterr()
    trials = pd.read_parquet(reference.directory / "trials.parquet")
    row = trials[(trials["kind"] == "neuron") & (trials["site_index"] == 5) & (trials["bit"] == 30)].iloc[0]
    expected = f"Layer #5: {row['mismatches']} / {row['golden_correct']} = {100 * row['misclassification_rate']:.4f}%, Conv2d"
    assert expected in result.out
    for name in ("per_site.csv", "per_bit.csv", "per_type.csv", "per_site.png", "site_by_bit.png", "per_bit.png"):
        assert (tmp_path / name).stat().st_size > 200, name
    assert (tmp_path / "per_site.png").read_bytes()[:4] == b"\x89PNG"
    assert "masked %" in result.out and "SDC %" in result.out and "failure %" in result.out
    assert "PARTIAL" not in result.out
    assert list(tmp_path.glob("seed_layout*.csv"))


def test_trials_failing_without_retries_are_reported_and_finished_by_resume(ray_address, tmp_path):
    crash_dir = tmp_path / "crashes"
    crash_dir.mkdir()
    spec = CampaignSpec(model="demo:vgg", weights="none", images=300, layers="0-1", sites=("neuron",), bits="30",
                        max_failures=0, out=str(tmp_path), name="fragile")
    first = run_campaign(spec, _crash_once_dir=str(crash_dir))
    assert not first.complete and first.finished == 0 and first.errored == 2
    assert sorted(e.split(":")[0] for e in first.errors) == sorted(p.name for p in crash_dir.iterdir())
    second = run_campaign(spec_from_directory(first.directory), _crash_once_dir=str(crash_dir))
    assert second.complete and second.errored == 0 and second.injections == 600


def test_failed_trials_are_named_from_the_campaign_s_own_record_not_tune_s_result_config(tmp_path):
    """Tune may hand back a failed trial's result with ``config`` None: the failures come from
    the callback, which reads Tune's Trial at the error, and from the commit markers."""
    from types import SimpleNamespace

    from campaign.runner import TrialErrors, failure_lines

    points = [TrialPoint(kind="neuron", site=s, bit=30, seed=7) for s in (0, 1, 2)]
    error_file = tmp_path / "error.txt"
    error_file.write_text("Failure # 1 (occurred at 2026-12-03)\nTraceback ...\nRuntimeError: worker died\n\n")
    callback = TrialErrors()
    trials = [SimpleNamespace(trial_id=f"t{i}", config={"trial": dataclasses.asdict(p)}, error_file=None)
              for i, p in enumerate(points)]
    for trial in trials:
        callback.on_trial_start(0, trials, trial)
    trials[1].config, trials[1].error_file = None, str(error_file)  # what a Result without config looks like
    callback.on_trial_error(0, trials, trials[1])
    keys = [p.key for p in points]
    assert callback.reasons == {keys[1]: "RuntimeError: worker died"}
    assert failure_lines(keys, frozenset({keys[0]}), callback.reasons) == (
        f"{keys[1]}: RuntimeError: worker died", f"{keys[2]}: did not finish (no error reported by Tune)")
    assert failure_lines(keys, frozenset(keys), callback.reasons) == ()


@pytest.fixture(scope="module")
def moved_and_damaged(reference, tmp_path_factory):
    """The reference campaign copied to a directory of another name, three trials damaged
    (a faults file deleted, a bits part truncated, a trial part deleted) and trials.parquet
    garbled, then resumed."""
    moved = tmp_path_factory.mktemp("copy") / "moved"
    shutil.copytree(reference.directory, moved)
    keys = sorted(p.stem for p in (moved / "parts" / "done").glob("*.json"))
    damaged = (keys[0], keys[5], keys[9])
    (moved / "faults" / f"{damaged[0]}.parquet").unlink()
    bits = moved / "parts" / "bits" / f"{damaged[1]}.parquet"
    bits.write_bytes(bits.read_bytes()[:100])
    (moved / "parts" / "trials" / f"{damaged[2]}.parquet").unlink()
    (moved / "trials.parquet").write_bytes(b"not parquet")
    return moved, damaged, run_campaign(spec_from_directory(moved))


def test_resume_reruns_exactly_the_trials_with_missing_or_damaged_files(reference, moved_and_damaged):
    moved, damaged, outcome = moved_and_damaged
    assert outcome.complete and outcome.errored == 0
    assert outcome.rerun_damaged == damaged and outcome.launched == 3 and outcome.injections == 3 * 600
    for a, b in zip(result_frames(reference.directory), result_frames(moved)):
        pd.testing.assert_frame_equal(a, b)
    assert len(pd.read_parquet(moved / "trials.parquet")) == reference.total
    assert len(pd.read_parquet(moved / "faults")) == 600 * reference.total  # record=all
    assert len(pd.read_parquet(moved / "bits.parquet")) == len(pd.read_parquet(reference.directory / "bits.parquet"))


def test_a_moved_campaign_keeps_one_name(moved_and_damaged):
    moved, _, _ = moved_and_damaged
    for part in ("trials.parquet", "bits.parquet", "faults", "parts/trials", "parts/bits"):
        assert set(pd.read_parquet(moved / part)["campaign"]) == {"moved"}, part
    assert list(analysis.load(moved)["campaign"].unique()) == ["moved"]
    text = report.run([str(moved)], out_dir=str(moved.parent / "report"))
    assert f"  moved ({moved}):" in text and "PARTIAL" not in text
