"""Campaign integrity without Ray: content digests in the identity, commit markers, outcome
classes, one-line errors for bad input, and what a newcomer sees (issue 8, items 2-7)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_data import write_cifar
from test_models import write_hub
from torch import nn

from analysis import report
from campaign import cli, processes
from campaign.runner import (_NOTICE_FILTER, CampaignOutcome, Progress, TrialFolders, _DropMetricsNotice, record_spec, run_campaign,
                             settings_for, spec_from_directory)
from campaign.spec import CampaignSpec, SpecError, resolve
from trainables import results as R
from trainables.inject import engine
from trainables.trial import CampaignSettings, TrialPoint, run_trial
from trainables.zoo.models import load_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(images=64, layers="1", sites=("neuron",), bits="30")


# ---------------------------------------------------------------- item 2: content digests


def test_resume_after_the_weights_file_changed_is_refused_in_one_line(tmp_path):
    weights = tmp_path / "w.pt"
    state = load_model("demo:vgg", weights="none").state_dict()
    torch.save(state, weights)
    plan = resolve(CampaignSpec(model="demo:vgg", weights=str(weights), **TINY, out=str(tmp_path), name="c"))
    record_spec(plan)
    before = plan.identity()["weights_sha256"]
    assert resolve(spec_from_directory(plan.directory)).identity() == plan.identity()  # same inputs: same campaign
    state["features.0.weight"][0, 0, 0, 0] += 1.0
    torch.save(state, weights)
    after = resolve(spec_from_directory(plan.directory)).identity()["weights_sha256"]
    with pytest.raises(SpecError) as info:
        run_campaign(spec_from_directory(plan.directory))  # refused before Ray starts
    message = str(info.value)
    assert "\n" not in message and f"the weights changed: sha256 {before[:12]} then, {after[:12]} now" in message
    assert sorted(p.name for p in plan.directory.iterdir()) == ["spec.json"]
    settings = CampaignSettings.from_dict(settings_for(plan))  # a worker of the campaign planned before the change
    t = plan.trials[0]
    with pytest.raises(ValueError, match=rf"inputs changed since the campaign was planned \(the weights changed: "
                                         rf"sha256 {before[:12]} then, {after[:12]} now\)"):
        run_trial(settings, TrialPoint(t.kind, t.site, t.bit, t.seed))
    assert R.check_trials(plan.directory).finished == frozenset()


def test_changed_data_and_hub_code_are_refused_and_named(tmp_path):
    hub = Path(write_hub(tmp_path / "hub"))
    write_cifar(tmp_path / "data", "cifar10", n=20)
    spec = CampaignSpec(model="chenyaofo:cifar10_resnet20", hub_dir=str(hub), weights="none", data_root=str(tmp_path / "data"),
                        sites=("neuron",), layers="1", bits="30", out=str(tmp_path), name="zoo")
    plan = resolve(spec)
    assert set(plan.inputs) == {"weights_sha256", "data_sha256", "hub_code_sha256"}
    record_spec(plan)
    (hub / "hubconf.py").write_text((hub / "hubconf.py").read_text() + "\n# edited\n")
    with pytest.raises(SpecError, match=r"differs in: the hub code changed: sha256 \w{12} then, \w{12} now\)") as info:
        run_campaign(spec)
    assert "the data" not in str(info.value) and "the weights" not in str(info.value)
    write_hub(hub)  # the original code again
    write_cifar(tmp_path / "data", "cifar10", n=21)  # one more image: other tensors
    with pytest.raises(SpecError, match=r"differs in: the data \(images and labels used\) changed: sha256"):
        run_campaign(spec)


# ---------------------------------------------------------------- item 3: commit markers


def _settings(directory, **changes):
    values = dict(name="t", directory=str(directory), model="demo:vgg", dataset="fashion-mnist", weights="none",
                  images=300, report_every=300, record="all")
    return CampaignSettings(**{**values, **changes})


def test_trial_files_are_committed_and_damage_is_found_with_its_reason(tmp_path):
    points = [TrialPoint("neuron", 1, 30, 1), TrialPoint("neuron", 2, 30, 1), TrialPoint("weight", 1, 30, 1)]
    for point in points:
        run_trial(_settings(tmp_path), point)
    a, b, c = (p.key for p in points)
    marker = json.loads((tmp_path / "parts" / "done" / f"{a}.json").read_text())
    assert sorted(marker["files"]) == [f"faults/{a}.parquet", f"parts/bits/{a}.parquet", f"parts/trials/{a}.parquet"]
    assert marker["files"][f"faults/{a}.parquet"]["size"] == (tmp_path / "faults" / f"{a}.parquet").stat().st_size
    assert R.check_trials(tmp_path).finished == {a, b, c}
    (tmp_path / "faults" / f"{a}.parquet").unlink()
    bits = tmp_path / "parts" / "bits" / f"{b}.parquet"
    size = bits.stat().st_size
    bits.write_bytes(bits.read_bytes()[:100])
    trial = tmp_path / "parts" / "trials" / f"{c}.parquet"
    raw = bytearray(trial.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, other content
    trial.write_bytes(bytes(raw))
    check = R.check_trials(tmp_path)
    assert check.finished == frozenset() and check.damaged == {
        a: f"faults/{a}.parquet missing", b: f"parts/bits/{b}.parquet 100 bytes, {size} committed",
        c: f"parts/trials/{c}.parquet content differs from the committed SHA-256"}
    assert R.aggregate(tmp_path).num_rows == 0  # damaged trials are not finished
    for key in (a, b, c):
        R.discard_trial(tmp_path, key)
    assert list((tmp_path / "faults").iterdir()) == [] and R.check_trials(tmp_path).damaged == {}


def test_aggregate_reads_each_part_once_and_writes_the_same_files_as_check_then_read(tmp_path, monkeypatch):
    points = [TrialPoint("neuron", 1, 30, 1), TrialPoint("weight", 1, 30, 1)]
    for point in points:
        run_trial(_settings(tmp_path), point)
    keys = sorted(p.key for p in points)
    R.aggregate(tmp_path, keys=R.check_trials(tmp_path).finished)  # check, then read the parts again
    separate = {name: (tmp_path / name).read_bytes() for name in (R.TRIALS_FILE, R.BITS_FILE)}
    reads = []
    for name in ("read_bytes", "read_table"):
        real = getattr(R.storage, name)
        monkeypatch.setattr(R.storage, name, lambda loc, real=real, **kw: reads.append(
            Path(loc).relative_to(tmp_path).as_posix()) or real(loc, **kw))
    state, trials = R.check_and_aggregate(tmp_path)
    assert state.finished == set(keys) and trials.column("trial_key").to_pylist() == [points[0].key, points[1].key]
    assert sorted(reads) == sorted(f"{folder}/{key}.{ext}" for key in keys for folder, ext in
                                   (("parts/done", "json"), ("parts/trials", "parquet"), ("parts/bits", "parquet")))
    assert {name: (tmp_path / name).read_bytes() for name in (R.TRIALS_FILE, R.BITS_FILE)} == separate


def test_commits_checked_as_trials_finish_are_not_read_again_and_give_the_same_files(tmp_path, monkeypatch):
    """A CommitWatch reads each finished trial once, while a campaign runs, against the commit
    the trial reported (else its marker); the final check then reads only the others, and
    aggregates the same bytes as check-then-read."""
    points = [TrialPoint("neuron", 1, 30, 1), TrialPoint("neuron", 2, 30, 1), TrialPoint("weight", 1, 30, 1)]
    reported = []
    for point in points:
        run_trial(_settings(tmp_path), point, report=reported.append)
    a, b, c = (p.key for p in points)
    R.aggregate(tmp_path, keys=R.check_trials(tmp_path).finished)
    separate = {name: (tmp_path / name).read_bytes() for name in (R.TRIALS_FILE, R.BITS_FILE)}
    bits = tmp_path / "parts" / "bits" / f"{b}.parquet"
    good_bits = bits.read_bytes()
    bits.write_bytes(good_bits[:100])  # b is damaged when the watch looks
    reads = []
    real = R.storage.read_bytes
    monkeypatch.setattr(R.storage, "read_bytes", lambda loc: reads.append(Path(loc).relative_to(tmp_path).as_posix())
                        or real(loc))
    watch = R.CommitWatch(tmp_path)
    for key, committed in ((a, None), (b, None), (a, None), (c, json.loads(reported[-1]["commit"]))):  # a twice: checked once
        watch.finished(key, committed)
    verified = watch.results()
    assert sorted(verified) == [a, c] and sorted(verified[a]) == [f"parts/bits/{a}.parquet", f"parts/trials/{a}.parquet"]
    parts = lambda *keys: [f"parts/{role}/{k}.parquet" for k in keys for role in ("trials", "bits")]  # noqa: E731
    assert sorted(reads) == sorted([f"parts/done/{a}.json", f"parts/done/{b}.json"] + parts(a, b, c))  # c: no marker
    bits.write_bytes(good_bits)  # the final check reads b again
    reads.clear()
    state, trials = R.check_and_aggregate(tmp_path, verified=verified)
    assert state.finished == {a, b, c} and state.damaged == {}
    assert sorted(reads) == sorted([f"parts/done/{b}.json"] + parts(b))
    assert {name: (tmp_path / name).read_bytes() for name in (R.TRIALS_FILE, R.BITS_FILE)} == separate
    (tmp_path / "parts" / "done" / f"{a}.json").unlink()  # a verified trial counts only while its marker is there
    assert R.check_trials(tmp_path, verified=verified).finished == {b, c}
    stale = {**json.loads(reported[-1]["commit"]), f"parts/bits/{c}.parquet": {"size": 1, "sha256": "0" * 64}}
    other = R.CommitWatch(tmp_path)
    other.finished(c, stale)  # a commit its files do not match is left to the final check
    assert other.results() == {}


@pytest.mark.parametrize("resources, per_trial, expected", [
    ({"CPU": 2.0}, {}, 8),  # 2 trials at once: Tune queues 8, not its default of 200
    ({"CPU": 64.0, "GPU": 8.0}, dict(cpus_per_trial=1.0, gpus_per_trial=0.5), 32),  # 16 GPU slots
    ({"CPU": 64.0}, dict(max_concurrent=20), 40),
    ({"CPU": 256.0}, dict(cpus_per_trial=2.0), 256),
])
def test_tune_queues_twice_the_trials_the_cluster_runs_at_once(resources, per_trial, expected, monkeypatch):
    from campaign import runner

    monkeypatch.setattr(runner.ray, "cluster_resources", lambda: resources)
    assert runner.max_pending(CampaignSpec(**per_trial)) == expected


def test_report_on_a_partial_campaign_says_it_is_partial(tmp_path):
    plan = resolve(CampaignSpec(model="demo:vgg", weights="none", images=64, layers="1,2", sites=("neuron",), bits="30",
                                out=str(tmp_path), name="part"))
    record_spec(plan)
    settings = _settings(plan.directory, name="part", images=64, report_every=64)
    first, second = plan.trials
    run_trial(settings, TrialPoint(first.kind, first.site, first.bit, first.seed))
    R.aggregate(plan.directory)
    text = report.run([str(plan.directory)], out_dir=str(tmp_path / "r1"))
    assert f"PARTIAL campaign {plan.directory}: 1 of 2 trials finished. The tables cover the 1 finished, intact" in text
    run_trial(settings, TrialPoint(second.kind, second.site, second.bit, second.seed))
    R.aggregate(plan.directory)
    assert report._completeness([plan.directory]) == []  # the lines report.run puts first
    full = report.run([str(plan.directory)], out_dir=str(tmp_path / "r2"))
    assert f"  part ({plan.directory}): demo:vgg / fashion-mnist / fp32 / neuron faults; 2 trials, 128 faults" in full
    first_key, second_key = (R.trial_key(t.kind, t.site, t.bit, t.seed) for t in (first, second))
    (plan.directory / "faults" / f"{first_key}.parquet").unlink()  # damaged after the campaign finished
    (line, _), = [report._completeness([plan.directory])]
    assert line.startswith(f"PARTIAL campaign {plan.directory}: 1 of 2 trials finished; trials.parquet holds 2; "
                           "1 with missing or damaged files (neuron-s0001-b30-seed")
    # the header and the tables agree: they count the intact trial only, not the old aggregate's two
    text = report.run([str(plan.directory)], out_dir=str(tmp_path / "r3"))
    assert "The tables cover the 1 finished, intact trial(s) only" in text
    assert f"  part ({plan.directory}): demo:vgg / fashion-mnist / fp32 / neuron faults; 1 trials, 64 faults" in text
    per_site = pd.read_csv(tmp_path / "r3" / "per_site.csv")
    assert per_site["site_index"].tolist() == [second.site] and per_site["images"].tolist() == [64]
    (plan.directory / "parts" / "done" / f"{second_key}.json").unlink()  # no intact trial left: one line
    with pytest.raises(ValueError, match=r"^no finished, intact trials to report in .*resume"):
        report.run([str(plan.directory)], out_dir=str(tmp_path / "r4"))


def test_trials_whose_machines_disagree_are_named_and_never_pooled(tmp_path, monkeypatch, capsys):
    """Two trials of one site on int8 kernels that compute differently (a quantized engine
    forced on each, as two CPU classes would): the rows say where they ran and differ in their
    golden digest; run's end and report warn in one line naming both groups; no table pools them."""
    from trainables.zoo import quantization as Q

    engines = [e for e in Q.FORCEABLE if e in Q._supported_engines()]
    plan = resolve(CampaignSpec(model="demo:vgg", weights="none", images=64, layers="1", sites=("neuron",), bits="6",
                                quantize="int8", num_seeds=2, out=str(tmp_path), name="mixed"))
    record_spec(plan)
    settings = _settings(plan.directory, name="mixed", images=64, report_every=64, mode="int8", record="none")
    rows = {}
    for engine_name in engines:  # each forced engine's golden digest, on the first trial
        monkeypatch.setenv(Q.ENGINE_VARIABLE, engine_name)
        rows[engine_name] = run_trial(settings, TrialPoint(*dataclasses.astuple(plan.trials[0])))
    first, second = next((a, b) for i, a in enumerate(engines) for b in engines[i + 1:]
                         if rows[a]["golden_digest"] != rows[b]["golden_digest"])
    points = [TrialPoint(*dataclasses.astuple(t)) for t in plan.trials]
    for point, engine_name in zip(points, (first, second)):  # as if the two trials ran on two CPU classes
        monkeypatch.setenv(Q.ENGINE_VARIABLE, engine_name)
        run_trial(settings, point)
    R.aggregate(plan.directory)
    trials = pd.read_parquet(plan.directory / "trials.parquet").set_index("trial_key").loc[[p.key for p in points]]
    assert trials["golden_digest"].tolist() == [rows[first]["golden_digest"], rows[second]["golden_digest"]]
    assert trials["torch_version"].tolist() == [torch.__version__] * 2
    assert trials["hardware"].str.match(rf"cpu .+ \({torch.backends.cpu.get_cpu_capability()}\); int8 ").all()
    assert [h.split("; int8 ")[1].split(" ")[0] for h in trials["hardware"]] == [first, second]
    groups = sorted(f"golden {d} on 1 trial(s)" for d in trials["golden_digest"])
    text = report.run([str(plan.directory)], out_dir=str(tmp_path / "report"))
    warning, = [line for line in text.splitlines() if line.startswith("WARNING")]
    assert warning.startswith("WARNING campaign mixed: its trials disagree on the fault-free (golden) outputs")
    assert all(g in warning for g in groups)
    per_site = pd.read_csv(tmp_path / "report" / "per_site.csv")
    assert sorted(per_site["golden"]) == sorted(trials["golden_digest"]) and (per_site["trials"] == 1).all()
    assert len(pd.read_csv(tmp_path / "report" / "per_bit.csv").query("bit == 6")) == 2
    outcome = CampaignOutcome(plan.directory, 2, 2, (), 1.0, 128, 2)
    capsys.readouterr()
    assert cli._finish(outcome) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == warning


# ---------------------------------------------------------------- item 5: outcome classes


class _SignSum(nn.Module):
    """logits = [s, 0, -s] with s the sum of the two input values: class 0 for +1.5, +1.5 and
    class 2 for -1.5, -1.5. Flipping bit 30 of 1.5 gives NaN; flipping bit 31 gives s = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0], [-1.0, -1.0]]))

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_every_fault_is_masked_sdc_or_nonfinite_and_failure_rate_counts_nonfinite():
    images = torch.tensor([1.5, -1.5]).repeat_interleave(4).view(8, 1, 1, 1).expand(8, 1, 1, 2).contiguous()
    labels = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2])
    bench = engine.prepare(_SignSum(), (images, labels), "fp32", batch_size=3, device="cpu")
    site = bench.sites[0]  # the input
    nan = engine.run_faults(bench, site, "neuron", 30, seed=1, record="all").counts
    # NaN logits: argmax 0, so the four class-0 images look "unchanged" to the seed's metric
    assert (nan.total("nonfinite"), nan.total("sdc"), nan.masked, nan.mismatches) == (8, 0, 0, 4)
    assert nan.misclassification_rate == 0.5 and nan.failure_rate == 1.0 and nan.sdc_rate == 0.0
    sign = engine.run_faults(bench, site, "neuron", 31, seed=1).counts
    assert (sign.total("nonfinite"), sign.total("sdc"), sign.masked, sign.mismatches) == (0, 4, 4, 4)
    assert sign.misclassification_rate == 0.5 == sign.failure_rate and sign.sdc_rate == 0.5 == sign.masked_rate


def test_trial_rows_bits_and_faults_carry_the_outcome_classes(tmp_path):
    row = run_trial(_settings(tmp_path, images=600, weights=None), TrialPoint("neuron", 1, 30, 4))  # trained weights
    faults = pd.read_parquet(tmp_path / "faults")
    expected = np.where(faults["nonfinite"], "nonfinite", np.where(faults["changed"], "sdc", "masked"))
    assert (faults["outcome"] == expected).all() and len(faults) == 600
    counts = faults["outcome"].value_counts()
    assert (row["masked"], row["sdc"], row["nonfinite"]) == tuple(int(counts.get(k, 0)) for k in ("masked", "sdc", "nonfinite"))
    assert row["failures"] == int((faults["golden_correct"] & (faults["changed"] | faults["nonfinite"])).sum())
    assert min(row["masked"], row["sdc"], row["nonfinite"]) > 0 and row["failure_rate"] == row["failures"] / row["golden_correct"]
    assert row["failures"] > row["mismatches"]  # golden-correct images whose NaN logits kept argmax = golden
    bits = pd.read_parquet(tmp_path / "parts" / "bits")
    assert bits[["sdc", "failures", "nonfinite"]].sum().tolist() == [row["sdc"], row["failures"], row["nonfinite"]]


# ---------------------------------------------------------------- item 6: bad input, one line


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain_checkpoint(tmp_path) -> str:
    path = tmp_path / "plain.pt"
    torch.save(load_model("demo:vgg", weights="none").state_dict(), path)
    return str(path)


BAD_INPUT = [
    (["run", "--seeds", str(2**63)], {}, "error: seeds: need whole numbers in 0..9223372036854775807"),
    (["run", "--master-seed", str(2**63)], {}, "error: master_seed: use -1"),
    (["run", "--model", "torchvision:resnet18", "--dataset", "fashion-mnist", "--images", "8"], {},
     "error: model torchvision:resnet18 does not accept fashion-mnist's 1x28x28 images (Given groups=1"),
    (["eval", "--model", "torchvision:resnet18", "--dataset", "fashion-mnist", "--images", "8"], {},
     "error: model torchvision:resnet18 does not accept fashion-mnist's 1x28x28 images"),
    (["run", "--out", "/proc/bitflip-campaigns"], {}, "error: out: cannot write to /proc/bitflip-campaigns/"),
    (["run", "--address", "127.0.0.1:{port}"], {}, "error: address: cannot reach a Ray cluster at 127.0.0.1:"),
    (["run", "--address", "nonsense"], {}, "error: address: 'nonsense' is not host:port"),
    (["run", "--model", "torchvision:alexnet2"], {}, "error: unknown torchvision architecture 'alexnet2'"),
    (["layers", "--model", "nosuch:x"], {}, "error: unknown model source 'nosuch'"),
    (["run", "--model", "file:{ckpt}", "--dataset", "fashion-mnist"], {}, "--model demo:vgg --weights"),
    (["run"], {"bit_flip_pos": "abc"}, "error: environment variable bit_flip_pos='abc': not a whole number"),
    (["run"], {"bit_flip_pos": "40"}, "error: environment variable bit_flip_pos='40': use -1"),
    (["run"], {"layer_num": "5-2"}, "error: environment variable layer_num='5-2': range 5-2 is reversed: write 2-5"),
    (["run", "--images", "2.5"], {}, "error: images: cannot read '2.5' as a whole number or all"),
    (["run", "--bits", "31-0"], {}, "error: bits: range 31-0 is reversed: write 0-31"),
    (["run", "--layers", "5-2"], {}, "error: layers: range 5-2 is reversed: write 2-5"),
    (["run", "--dtype", "fp64"], {}, "error: argument --dtype: invalid choice: 'fp64'"),
    (["run", "--batch-size", "many"], {}, "error: argument --batch-size: invalid int value: 'many'"),
    (["run", "--gpus-per-trial", "nan"], {}, "error: gpus_per_trial: must be a finite number, got nan"),
    (["run", "--max-concurrent", "0"], {}, "error: max_concurrent: must be a positive integer, got 0"),
    (["run", "--num-seeds", "1000000000"], {}, "error: num_seeds: at most 100,000"),
    (["run", "--name", " "], {}, "error: name: ' ' must be a plain directory name"),
    (["run", "--name", "n" * 300], {}, "error: name: 300 bytes long: a directory name has at most 255"),
    (["run", "{tmp}"], {}, "is a directory: pass a YAML file (to finish a campaign: `python -m campaign resume"),
    (["resume", "{tmp}/edited"], {}, "edited/spec.json is not a complete campaign spec (KeyError: 'spec')"),
    (["eval", "--device", "tpu"], {}, "error: device: 'tpu': use cpu, cuda or cuda:N"),
]


@pytest.mark.parametrize("argv,env,expected", BAD_INPUT, ids=[" ".join(a[:3]) + (f" {e}" if e else "") for a, e, _ in BAD_INPUT])
def test_bad_input_gets_one_line_before_any_work(argv, env, expected, tmp_path, monkeypatch, capsys):
    for knob in ("bit_flip_pos", "layer_num", "layer_nums", "seed", "batch_size", "model_name", "dataset"):
        monkeypatch.delenv(knob, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "spec.json").write_text('{"name": "edited"}')
    argv = [a.format(port=_closed_port(), ckpt=_plain_checkpoint(tmp_path) if "{ckpt}" in a else "", tmp=tmp_path)
            for a in argv]
    if argv[0] == "run":
        argv += [] if "--out" in argv else ["--out", str(tmp_path / "out")]
        argv += [] if "--model" in argv else ["--weights", "none"]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    for noise in ("usage:", "Traceback", "tuple[", "| None", "--arch"):
        assert noise not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- item 7: what a newcomer sees


def test_progress_shows_no_eta_before_a_trial_finished(capsys):
    class Trial:
        def __init__(self, trial_id):
            self.trial_id = trial_id

    progress = Progress(total=4, already=1, images_per_trial=100, every_s=0)
    progress.on_trial_result(0, [], Trial("a"), {"images": 50})
    progress.on_trial_complete(0, [], Trial("b"))
    lines = capsys.readouterr().out.splitlines()
    assert "ETA" not in lines[0] and lines[0].startswith("[campaign] 1/4 trials, ")
    assert lines[1].startswith("[campaign] 2/4 trials, ") and ", ETA 00:" in lines[1]


def test_tune_metrics_notice_is_dropped_and_finished_trials_leave_no_empty_folder(tmp_path):
    def record(message):
        return logging.LogRecord("ray.tune.analysis.experiment_analysis", logging.WARNING, __file__, 1, message, None, None)

    assert not _DropMetricsNotice().filter(record("Failed to fetch metrics for 3 trial(s):\n- f_1: FileNotFoundError(...)"))
    assert _DropMetricsNotice().filter(record("No checkpoints have been found for trial f_1."))

    class Trial:
        def __init__(self, local_path):
            self.local_path = local_path

    empty, errored = tmp_path / "a", tmp_path / "b"
    empty.mkdir()
    errored.mkdir()
    (errored / "error.txt").write_text("Traceback ...")
    for trial in (Trial(str(empty)), Trial(str(errored)), Trial(str(tmp_path / "gone")), Trial(None)):
        TrialFolders().on_trial_complete(0, [], trial)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and (errored / "error.txt").exists()


def test_ray_token_notice_is_dropped_but_its_security_warnings_are_not():
    def record(message):
        return logging.LogRecord("ray", logging.WARNING, __file__, 1, message, None, None)

    assert not _NOTICE_FILTER.filter(record("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=..."))
    assert _NOTICE_FILTER.filter(record("Token authentication is disabled for this Ray cluster. Anyone with ..."))


def test_processes_of_a_killed_driver_are_stopped_and_nothing_else(tmp_path):
    registry = tmp_path / "registry"
    driver_code = textwrap.dedent(f"""
        import subprocess, sys, time
        from pathlib import Path
        from campaign import processes
        own = subprocess.Popen(["sleep", "600"])  # the user's, before Ray started: never stopped
        processes.note_preexisting()
        kids = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
        processes.record_started(Path({str(registry)!r}))
        print(" ".join(str(k.pid) for k in kids), own.pid, flush=True)
        time.sleep(600)
    """)
    kids: list[int] = []
    bystander = subprocess.Popen(["sleep", "600"])
    driver = subprocess.Popen([sys.executable, "-c", driver_code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        *kids, own = [int(p) for p in driver.stdout.readline().split()]
        assert len(kids) == 2 and processes.stop_orphans(registry) == []  # its driver still runs
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        assert sorted(processes.stop_orphans(registry)) == sorted(kids)
        assert all(processes.start_time(k) is None for k in kids)
        assert bystander.poll() is None and list(registry.iterdir()) == []
        assert processes.start_time(own) is not None  # started by the driver before Ray: not ours to stop
        kids.append(own)  # cleaned up below
    finally:
        for process in (bystander, driver):
            process.kill()
            process.wait()
        for pid in kids:
            if processes.start_time(pid) is not None:
                os.kill(pid, signal.SIGKILL)


def test_layers_needs_no_data_files(tmp_path, monkeypatch, capsys):
    hub = write_hub(tmp_path / "hub")
    monkeypatch.setenv("BITFLIP_DATA_ROOT", str(tmp_path / "no-data-here"))
    code = cli.main(["layers", "--model", "chenyaofo:cifar10_resnet20", "--hub-dir", hub, "--weights", "none"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("chenyaofo:cifar10_resnet20 on cifar10 input [3, 32, 32]: 5 neuron sites")
    assert not (tmp_path / "no-data-here").exists()


def test_hostile_inputs_get_one_line_that_names_the_cause(tmp_path):
    """The hostile-input sweep's misleading lines (issue 19, item 5): each names the real cause."""
    def refusal(**values) -> str:
        with pytest.raises(SpecError) as info:
            resolve(CampaignSpec(images=16, out=str(tmp_path / "never"), **values))
        assert "\n" not in str(info.value) and not (tmp_path / "never").exists()
        return str(info.value)

    assert refusal(quantize="int8", sites=("qparam",), layers="99") == (
        "layers: layer(s) 99 do not exist in demo:vgg; its layers are 0..15 (see `python -m campaign layers`)")
    assert refusal(model="demo:vit", quantize="int8", sites=("neuron",), layers="3") == (
        "layers: 1 selected site(s) compute in float inside the int8 model (no int8 kernel for them, so their outputs "
        "are not 8-bit codes): 3 (encoder.layers.encoder_layer_0.self_attention, MultiheadAttention); leave them out "
        "of --layers, or study them without --quantize")
    every = resolve(CampaignSpec(model="demo:vit", quantize="int8", sites=("neuron",), images=16))  # all: left out, said
    assert 3 not in every.sites_by_kind["neuron"] and 2 in every.sites_by_kind["neuron"]
    assert every.notes[0].startswith("sites: 8 site(s) compute in float inside the int8 model and are left out: 3 (")
    assert refusal(model="demo:vgg", protect="ranger", calibration="synthetic-tokens:32:1000:4") == (
        "calibration: synthetic-tokens:32:1000:4 has sequences of 32 tokens; the evaluated images are 1x28x28")
    assert refusal(model="demo:text", protect="ranger", calibration="synthetic:1x28x28:10:8") == (
        "calibration: synthetic:1x28x28:10:8 has 1x28x28 images; the evaluated sequences have 32 tokens")
    profiled = resolve(CampaignSpec(images=16, sites=("neuron",), layers="3", protect="ranger")).protection
    profiled["sites"][1]["hi"] = "abc"
    bounds = tmp_path / "bounds.json"
    bounds.write_text(json.dumps(profiled))
    assert refusal(sites=("neuron",), layers="3", protect="ranger", bounds=str(bounds)) == (
        f"bounds: {bounds}: features.3 call 0 has hi 'abc', not a number")
