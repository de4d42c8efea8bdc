"""Clean stops when the campaign's disk fills (issue 23, item 3): one line naming the cause
and the resume command, a non-zero exit, no tracebacks, and a resume that loses nothing.
The object store's outage is in test_storage.py (its moto server)."""
from __future__ import annotations

import errno
import re
from types import SimpleNamespace

import pandas as pd
import pytest

from campaign import cli, outages, runner
from campaign.runner import OutageWatch, run_campaign
from campaign.spec import CampaignSpec
from trainables import storage

ARGS = ["--model", "demo:vgg", "--weights", "none", "--images", "64", "--layers", "0-2", "--sites", "neuron",
        "--bits", "random,30", "--record", "all", "--report-every", "32", "--max-concurrent", "1"]
SPEC = dict(model="demo:vgg", weights="none", images=64, layers="0-2", sites=("neuron",), bits="random,30",
            record="all", report_every=32)
TRIALS = 6
RUN_ONLY = ["wall_s", "device", "started_at", "worker", "campaign"]  # differ between runs by nature


def frames(directory):
    """trials.parquet, bits.parquet and faults/ without what differs between runs by nature."""
    def read(name):
        frame = pd.read_parquet(directory / name)
        return frame.drop(columns=[c for c in RUN_ONLY if c in frame.columns])

    faults = read("faults").sort_values(["trial_key", "image"]).reset_index(drop=True)
    return read("trials.parquet").reset_index(drop=True), read("bits.parquet").reset_index(drop=True), faults


def test_outages_are_named_in_our_words_and_other_errors_are_not(tmp_path, monkeypatch):
    free = storage.free_bytes(tmp_path)
    full = storage.outage(tmp_path, OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")))
    assert re.fullmatch(rf"the disk under {re.escape(str(tmp_path))} is full \(([\d,]+) bytes free\)", full)
    assert abs(int(re.search(r"\(([\d,]+) bytes", full).group(1).replace(",", "")) - free) < 1 << 30
    trial_error = "Failure # 1\nTraceback (most recent call last):\n...\nOSError: [Errno 28] No space left on device: '/x'\n"
    assert storage.outage(tmp_path, trial_error).startswith(f"the disk under {tmp_path} is full (")
    assert storage.outage(tmp_path, OSError(errno.EROFS, "Read-only file system")) == (
        f"the disk under {tmp_path} became read-only")
    for other in (ValueError("site 9 does not exist"), OSError(errno.ENOENT, "No such file"), "RuntimeError: boom"):
        assert storage.outage(tmp_path, other) is None
    uri = "s3://campaigns/runs/c"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    network = OSError("When reading information for key 'runs/c/x' in bucket 'campaigns': AWS Error NETWORK_CONNECTION "
                      "during HeadObject operation: curlCode: 7, Couldn't connect to server")
    assert storage.outage(uri, network) == ("the object store at http://127.0.0.1:1 stopped answering (curlCode: 7, "
                                            "Couldn't connect to server)")
    gone = OSError("Bucket 'campaigns' not found: AWS Error NO_SUCH_BUCKET during PutObject operation: The specified "
                   "bucket does not exist")
    assert storage.outage(uri, gone) == "the bucket 'campaigns' at http://127.0.0.1:1 is gone"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage.outage(uri, network) == "the object store of s3://campaigns stopped answering (curlCode: 7, " \
                                           "Couldn't connect to server)"
    assert storage.outage(uri, OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce")) is None


def test_the_watchdog_stops_on_a_disk_its_probe_finds_full_and_not_on_a_trial_s_own_error(tmp_path, monkeypatch):
    """A failed attempt of a trial whose error names the location makes the watchdog probe
    it: a passing probe lets Tune retry, a failing one (the disk's free space, monkeypatched
    here) stops Tune with the cause."""
    error = tmp_path / "error.txt"
    trial = SimpleNamespace(trial_id="t1", error_file=str(error), config={})
    watch = OutageWatch(tmp_path, {"t1": "neuron-s0001-b30-seed7"})
    monkeypatch.setattr(outages, "PROBE_PAUSE_S", 0.0)
    error.write_text("Traceback ...\nRuntimeError: the model refused the input\n")
    watch.on_trial_recover(0, [trial], trial)  # not the location's fault: nothing probed, nothing stopped
    assert watch.in_a_row == 0 and watch.cause is None
    error.write_text("Traceback ...\nOSError: [Errno 28] No space left on device: 'x'\n")
    watch.on_trial_recover(0, [trial], trial)  # the disk has room: a passing probe, Tune retries
    assert watch.in_a_row == 1 and watch.cause is None
    watch.on_trial_complete(0, [trial], trial)
    assert watch.in_a_row == 0
    running = [SimpleNamespace(trial_id=f"r{i}", error_file=str(error), config={}, status="RUNNING") for i in range(3)]
    for failing in running * 2:  # a blip fails the 3 running trials twice each: retried, not an outage
        watch.on_trial_recover(0, running, failing)
    assert watch.in_a_row == 6 and watch.cause is None
    with pytest.raises(outages.StorageOutage) as info:  # a third time: the workers cannot write, whatever the driver sees
        watch.on_trial_recover(0, running, running[0])
    assert info.value.cause == (f"the disk under {tmp_path} is full where the trials run (No space left on device: 7 "
                                "attempts in a row; this driver's probe passes)")
    watch = OutageWatch(tmp_path, {"t1": "neuron-s0001-b30-seed7"})
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: SimpleNamespace(free=4096, total=1 << 30, used=0))
    with pytest.raises(outages.StorageOutage) as info:
        watch.on_trial_recover(0, [trial], trial)
    assert info.value.cause == watch.cause == f"the disk under {tmp_path} is full (4,096 bytes free)"
    quiet = OutageWatch(tmp_path)  # the periodic check sees the same
    quiet.last_probe -= outages.PROBE_EVERY_S
    with pytest.raises(outages.StorageOutage):
        quiet.on_step_end(0, [])


def test_a_full_disk_stops_the_campaign_in_one_line_and_resume_loses_nothing(ray_address, tmp_path, monkeypatch, capfd):
    """Every write of the trials' workers fails with ENOSPC once 2 of the 6 trials have
    committed (a test hook: the driver's own disk keeps room, as on a cluster whose workers
    write to a disk of their own): Tune's retries fail alike, and the third failure in a row
    stops the campaign with one line naming the disk and the resume command."""
    reference = run_campaign(CampaignSpec(**SPEC, out=str(tmp_path), name="ref"))
    assert reference.complete
    directory = tmp_path / "full"
    real = runner.run_campaign
    monkeypatch.setattr(outages, "PROBE_PAUSE_S", 0.0)
    monkeypatch.setattr(runner, "run_campaign", lambda spec, **kw: real(
        spec, _write_failures={"dir": str(directory), "after": 2}, **kw))
    capfd.readouterr()
    code = cli.main(["run", *ARGS, "--out", str(tmp_path), "--name", "full"])
    out, err = capfd.readouterr()
    assert code == outages.EXIT_CODE == 75, out[-2000:] + err[-3000:]
    assert "Traceback" not in out + err and "Tune" not in err, err[-3000:]
    ours = [line for line in err.splitlines() if line.strip()]
    assert len(ours) == 1 and re.fullmatch(
        rf"stopped: the disk under {re.escape(str(directory))} is full where the trials run \(No space left on device: "
        rf"3 attempts in a row; this driver's probe passes\); once that is fixed, run "
        rf"`python -m campaign resume {re.escape(str(directory))}` to finish the campaign \(nothing committed is lost\)",
        ours[0]), err[-3000:]
    assert len(list((directory / "parts" / "done").glob("*.json"))) == 2
    monkeypatch.setattr(runner, "run_campaign", real)
    assert cli.main(["resume", str(directory)]) == 0
    out = capfd.readouterr().out
    assert f"\n{TRIALS}/{TRIALS} trials ({TRIALS - 2} run now)" in out
    for a, b in zip(frames(reference.directory), frames(directory)):
        pd.testing.assert_frame_equal(a, b)
