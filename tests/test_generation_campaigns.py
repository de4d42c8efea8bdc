"""Generation campaigns through the whole tool (python -m campaign run/layers/report with prompts:
data): every row, per-bit row, per-step count and record equals trainables.inject.generation.
run_generation called here on demo:lm with the same prompts; bad input is one line before any work."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from campaign import cli
from trainables.inject import generation as G
from trainables.zoo.models import load_model

PROMPTS = ["In the beginning God created", "And the earth was", "", "Blessed are the meek"]
NEW = 4


def campaign(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Run the oracle on one thread, as the campaign's workers do (--cpus-per-trial 1): float reductions
    split over threads round differently, and the faults' recorded values would differ in the last bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench(prompts_file, one_thread):
    """The engine's own generation of the same prompts (the oracle of every campaign figure)."""
    from trainables.zoo.data import load_dataset

    prompts = load_dataset(f"prompts:{prompts_file}", model="demo:lm")
    assert len(prompts) == 3 and len({len(t) for t in prompts.token_ids}) > 1  # chunks of several lengths
    return G.prepare_generation(load_model("demo:lm"), prompts.token_ids, NEW, "fp32", batch_size=256, device="cpu")


@pytest.fixture(scope="module")
def ran(prompts_file, ray_address, tmp_path_factory):
    """One CLI campaign on Ray: neuron and kv faults at decode steps 0 and 2, weight faults; bit 30, seed 3."""
    import contextlib
    import io

    out_dir = tmp_path_factory.mktemp("runs")
    args = ["run", "--model", "demo:lm", "--dataset", f"prompts:{prompts_file}", "--new-tokens", str(NEW), "--steps", "0,2",
            "--sites", "neuron,weight,kv", "--layers", "3", "--bits", "30", "--seeds", "3", "--record", "all",
            "--max-concurrent", "1", "--out", str(out_dir), "--name", "gen"]  # one worker: one model load, one golden run
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(args)
    assert code == 0, err.getvalue()
    return out_dir / "gen", out.getvalue()


def expected(bench, kind: str, index: int, step):
    steps = None if step is None else [int(step)]
    return G.run_generation(bench, bench.site(kind, index), kind, 30, 3, steps, record="all")


def test_cli_campaign_rows_equal_run_generation(ran, bench):
    import analysis

    directory, out = ran
    trials = analysis.load(directory)
    assert sorted(trials["trial_key"]) == ["kv-s0003-b30-seed3-step0", "kv-s0003-b30-seed3-step2",
                                           "neuron-s0003-b30-seed3-step0", "neuron-s0003-b30-seed3-step2",
                                           "weight-s0003-b30-seed3"]
    assert set(trials["trial_kind"]) == {"generation"} and set(trials["new_tokens"]) == {NEW}
    faults, bits = analysis.load_faults(directory), analysis.load_bits(directory)
    for row in trials.itertuples(index=False):
        step = None if pd.isna(row.decode_step) else row.decode_step
        want = expected(bench, row.kind, row.site_index, step)
        c, rec = want.counts, want.records
        assert (row.images, row.identical, row.sdc, row.nonfinite, row.effective) == (
            c.faults, c.identical, c.sdc, c.nonfinite, c.effective)
        assert row.changed == c.faults - c.identical and row.golden_correct == 0 and pd.isna(row.misclassification_rate)
        assert row.edit_distance_sum == c.edit_sum and row.edit_distance_sq_sum == c.edit_sq_sum
        first = rec.first_divergence[rec.first_divergence >= 0]
        assert row.first_divergence_sum == first.sum() and row.first_divergence_sq_sum == (first.astype(float) ** 2).sum()
        assert [list(row.faults_by_step), list(row.sdc_by_step), list(row.nonfinite_by_step)] == c.by_step.tolist()
        assert (row.ci_low, row.ci_high) == analysis.tokens.wilson_interval(c.sdc, c.faults)
        assert row.path == ("full" if row.kind == "weight" else "golden-state")
        assert row.site_name == bench.site(row.kind, row.site_index).name
        mine = faults[faults["trial_key"] == row.trial_key].sort_values(["image", "step"])
        for column, values in (("image", rec.prompt), ("step", rec.step), ("position", rec.position),
                               ("kv_position", rec.kv_position), ("bit", rec.bit), ("raw_before", rec.raw_before),
                               ("first_divergence", rec.first_divergence), ("edit_distance", rec.edit_distance),
                               ("nonfinite", rec.nonfinite), ("changed", ~rec.identical)):
            np.testing.assert_array_equal(mine[column].to_numpy(dtype=values.dtype), values, err_msg=column)
        np.testing.assert_array_equal(mine["value_after"].to_numpy(), rec.value_after)
        per_bit = bits[bits["trial_key"] == row.trial_key]
        assert per_bit["bit"].tolist() == [30] and per_bit["sdc"].sum() == c.sdc and per_bit["identical"].sum() == c.identical
    # the kv trials flip the cache of layer 1's values (kv site 3), at the fault's step
    kv = faults[faults["kind"] == "kv"]
    assert set(kv["site_name"]) == {"kv.1.values"} and (kv["kv_position"] >= 0).all()
    assert "generation of 4 tokens" in out and "KV #3:" in out  # the run's own table


def test_report_prints_generation_tables_and_the_sdc_by_step_plot(ran, bench, tmp_path):
    from analysis.report import run

    directory, _ = ran
    text = run([str(directory)], out_dir=str(tmp_path))
    assert "Generation trials (greedy decoding)" in text and "Per decode step of the fault" in text
    assert "Layer #" in text and "misclassification" not in text  # never pooled with classification
    assert (tmp_path / "gen_sdc_by_step.png").stat().st_size > 0
    steps = pd.read_csv(tmp_path / "gen_per_step.csv")
    for kind in ("neuron", "kv"):
        a, b = expected(bench, kind, 3, 0).counts, expected(bench, kind, 3, 2).counts
        want = a + b
        mine = steps[steps["kind"] == kind].sort_values("step")
        assert mine["step"].tolist() == [0, 2]
        assert mine["faults"].tolist() == [int(want.by_step[0, s]) for s in (0, 2)]
        assert mine["sdc"].tolist() == [int(want.by_step[1, s]) for s in (0, 2)]
        np.testing.assert_allclose(mine["sdc_rate"], want.sdc_rate_by_step()[[0, 2]])
        site = pd.read_csv(tmp_path / "gen_per_site.csv")
        row = site[site["kind"] == kind].iloc[0]
        assert (row["faults"], row["sdc"], row["identical"]) == (want.faults, want.sdc, want.identical)
        assert f"{int(want.sdc)} / {int(want.faults)} faults" in text


def test_random_steps_trial_counts_per_drawn_step(bench, prompts_file, tmp_path, monkeypatch):
    """A random-step trial (run_trial, no Ray): one fault per prompt at its drawn step, equal to run_generation;
    the worker's next trial reuses its golden generation."""
    import dataclasses

    import analysis
    from campaign.runner import record_spec, settings_for
    from campaign.spec import CampaignSpec, resolve
    from trainables import results
    from trainables.trial import CampaignSettings, TrialPoint, run_trial

    spec = CampaignSpec(model="demo:lm", dataset=f"prompts:{prompts_file}", new_tokens=NEW, sites=("neuron",),
                        layers="11", bits="random", seeds=(8,), out=str(tmp_path), name="random")
    plan = resolve(spec)
    assert plan.spec.steps == "random" and [t.key for t in plan.trials] == ["neuron-s0011-brandom-seed8-steprandom"]
    record_spec(plan)
    row = run_trial(CampaignSettings.from_dict(settings_for(plan)), TrialPoint(**dataclasses.asdict(plan.trials[0])))
    want = G.run_generation(bench, bench.site("neuron", 11), "neuron", "random", 8, "random", record="all")
    assert row["faults_by_step"] == want.counts.by_step[0].tolist() and row["sdc"] == want.counts.sdc
    from trainables import generation_trial

    def no_second_golden_run(*args, **kwargs):
        raise AssertionError("the golden generation ran twice in one worker")

    monkeypatch.setattr(generation_trial.generation, "prepare_generation", no_second_golden_run)
    again = run_trial(CampaignSettings.from_dict(settings_for(plan)),
                      TrialPoint(**{**dataclasses.asdict(plan.trials[0]), "seed": 9}))
    other = G.run_generation(bench, bench.site("neuron", 11), "neuron", "random", 9, "random")
    assert again["faults_by_step"] == other.counts.by_step[0].tolist() and again["sdc"] == other.counts.sdc
    results.aggregate(plan.directory)
    table = analysis.generation.per_step(analysis.load(plan.directory))
    drawn = np.concatenate([want.records.step, G.run_generation(bench, bench.site("neuron", 11), "neuron", "random", 9,
                                                                 "random", record="all").records.step])
    assert table["step"].tolist() == sorted(set(drawn.tolist()))
    assert table["faults"].tolist() == [int((drawn == s).sum()) for s in table["step"]]
    faults = analysis.load_faults(plan.directory)  # --record changed (the default): changed or non-finite only
    mine = faults[faults["trial_key"] == plan.trials[0].key]
    assert len(mine) == int((~want.records.identical | want.records.nonfinite).sum())


@pytest.mark.parametrize("args, message", [
    (["--new-tokens", "4", "--steps", "5"], "steps: decode step 5 is beyond --new-tokens 4"),
    (["--new-tokens", "4", "--steps", "3", "--sites", "kv"], "kv steps are 0..2"),
    (["--protect", "relu6"], "protect: not for a generation campaign"),
    (["--quantize", "int8"], "quantize: not for a generation campaign"),
    (["--weight-format", "fp8_e4m3fn"], "weight_format: not for a generation campaign"),
    (["--images-per-weight-fault", "2"], "images_per_weight_fault: not for a generation campaign"),
    (["--new-tokens", "200"], "over the model's context length 128"),
    (["--sites", "kv", "--layers", "9"], "9 is no KV-cache site of demo:lm (kv sites 0..7"),
])
def test_bad_generation_input_is_one_line(capsys, prompts_file, tmp_path, args, message):
    code, out, err = campaign(capsys, "run", "--model", "demo:lm", "--dataset", f"prompts:{prompts_file}", *args,
                              "--out", str(tmp_path / "runs"))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--sites", "kv"], "sites: kv (KV-cache sites) exist only while a causal LM generates"),
    (["--new-tokens", "4"], "new_tokens: applies to generation campaigns"),
    (["--steps", "0,1"], "steps: applies to generation campaigns"),
    (["--sites", "kv", "--dataset", "synthetic:3x32x32:10:8", "--model", "demo:vgg"], "sites: kv (KV-cache sites)"),
])
def test_generation_options_without_prompts_are_one_line(capsys, tmp_path, args, message):
    model = [] if "--model" in args else ["--model", "demo:lm"]
    code, out, err = campaign(capsys, "run", *model, *args, "--out", str(tmp_path / "runs"))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_kv_sites_of_a_model_without_a_cache_are_refused(capsys, prompts_file, tmp_path):
    code, out, err = campaign(capsys, "run", "--model", "hf:data/demo-lm", "--model-arg", "use_cache=false",
                              "--dataset", f"prompts:{prompts_file}", "--sites", "kv", "--out", str(tmp_path / "runs"))
    assert code == 2 and err.count("\n") == 1 and "decodes without a KV cache (its config has use_cache False)" in err
    assert not (tmp_path / "runs").exists()


def test_layers_lists_the_kv_sites(capsys, prompts_file):
    code, out, err = campaign(capsys, "layers", "--model", "demo:lm", "--sites", "kv")
    assert code == 0, err
    kv = G.kv_sites(load_model("demo:lm"))
    assert [(s.layer, s.tensor) for s in kv] == [(layer, t) for layer in range(4) for t in ("keys", "values")]
    assert G.kv_table(kv) in out and "8 KV-cache sites" in out
    code, out, err = campaign(capsys, "layers", "--model", "demo:lm", "--dataset", f"prompts:{prompts_file}",
                              "--sites", "neuron,kv", "--layers", "3,4")
    assert code == 0, err
    assert G.kv_table(kv[3:5]) in out and "selected: 2 neuron, 2 kv sites" in out


def test_yaml_fields_and_identity_of_other_campaigns(tmp_path):
    from campaign.spec import CampaignSpec, spec_from_yaml

    path = tmp_path / "gen.yaml"
    path.write_text("model: demo:lm\ndataset: prompts:demo-lm-prompts\nnew_tokens: 6\nsteps: [0, 3, 5]\nsites: [neuron, kv]\n")
    spec = spec_from_yaml(path)
    assert (spec.new_tokens, spec.steps, spec.sites) == (6, "0,3,5", ("neuron", "kv"))
    # a spec without them keeps the defaults that leave older campaigns' identities as they were
    assert (CampaignSpec().new_tokens, CampaignSpec().steps) == (None, None)


def test_demo_prompts_are_shipped_and_checked():
    from trainables.zoo.data import load_dataset
    from trainables.zoo.models import DEMO_LM_DIR

    prompts = load_dataset("prompts:demo-lm-prompts", model="demo:lm")
    heldout = (DEMO_LM_DIR / "heldout.txt").read_text().splitlines()
    assert prompts.texts == tuple(" ".join(line.split()[:6]) for line in heldout[:32])
    assert all(len(t) + 16 <= 128 for t in prompts.token_ids)
    assert all(t.dtype == torch.int64 for t in prompts.token_ids)
