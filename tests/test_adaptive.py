"""Campaigns that stop each stratum at a margin: rounds, pooled stopping, sfi.json, resume
(the trials run directly instead of on Ray: the rounds are what is tested here)."""
import json

import pytest

from campaign import adaptive, runner
from campaign.spec import CampaignSpec, resolve
from trainables import sfi
from trainables.results import check_and_aggregate, finished_keys, trial_key, write_spec
from trainables.trial import CampaignSettings, TrialPoint, run_trial


def _direct(spec, *, resolved, only, **_):
    """run_campaign without Ray: the missing trials of ``only`` through run_trial, then aggregate."""
    settings = CampaignSettings.from_dict(runner.settings_for(resolved))
    done = finished_keys(resolved.directory)
    launched = [t for t in only if trial_key(t.kind, t.site, t.bit, t.seed, t.fault) not in done]
    write_spec(resolved.directory, {"name": "m"})
    rows = [run_trial(settings, TrialPoint(t.kind, t.site, t.bit, t.seed, t.fault, t.prior_k, t.prior_n, t.limit))
            for t in launched]
    check_and_aggregate(resolved.directory, {trial_key(t.kind, t.site, t.bit, t.seed, t.fault): t for t in only})
    return runner.CampaignOutcome(resolved.directory, len(only), len(only), (), 0.0, sum(r["images"] for r in rows),
                                  len(launched))


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(runner, "run_campaign", _direct)


def test_margin_campaign_stops_each_stratum_on_its_pooled_interval(tmp_path, direct):
    spec = CampaignSpec(sites=("neuron",), layers="15,16", bits="5,30", images=600, report_every=100, margin=0.06,
                        num_seeds=3, out=str(tmp_path), name="m")
    outcome = adaptive.run_margin_campaign(spec)
    record = json.loads((tmp_path / "m" / adaptive.SFI_FILE).read_text())
    assert record["margin"] == 0.06 and record["confidence"] == 0.95 and record["rounds"][0]["ran"]
    for s in record["strata"]:  # the recorded interval is the CS of the pooled counts, and decides
        low, high = sfi.confidence_sequence(s["mismatches"], s["golden_correct"], 0.95)
        assert (s["low"], s["high"]) == (low, high)
        assert s["reached"] == ((high - low) / 2 < 0.06)
        assert s["reached"] or s["trials"] == 3  # a stratum short of the margin used every seed
    # a stratum that reached the margin in round r got no trial in round r + 1
    ran = [{tuple(k) for k in r["ran"]} for r in record["rounds"]]
    assert all(later <= earlier for earlier, later in zip(ran, ran[1:]))
    assert len(ran[0]) == 4 and len(ran) >= 2 and len(ran[1]) < 4  # bit 5 of the logits needs few faults
    first = outcome.launched
    again = adaptive.run_margin_campaign(spec)  # resume: the same rounds from the part files, nothing to run
    assert again.launched == 0 and first == sum(len(r) for r in ran)
    assert json.loads((tmp_path / "m" / adaptive.SFI_FILE).read_text())["strata"] == record["strata"]


def test_a_later_round_stops_on_the_stratum_not_the_trial(tmp_path):
    settings = CampaignSettings(name="t", directory=str(tmp_path), model="demo:vgg", dataset="fashion-mnist",
                                images=600, report_every=100, target_margin=0.06, stop_interval="cs")
    alone = run_trial(settings, TrialPoint("neuron", 16, 30, 4))
    pooled = run_trial(settings, TrialPoint("neuron", 16, 30, 5, prior_k=300, prior_n=2000))
    assert pooled["stopped_early"] and pooled["images"] == 100  # 2000 earlier images: the first window suffices
    assert (alone["ci_low"], alone["ci_high"]) == sfi.confidence_sequence(alone["mismatches"], alone["golden_correct"])


def test_margin_and_target_margin_are_exclusive_and_checked():
    from campaign.spec import SpecError, check_plain_fields

    problems = check_plain_fields(CampaignSpec(margin=0.02, target_margin=0.02, confidence=1.5, stop_interval="x"))
    assert any(p.startswith("margin: stops each stratum") for p in problems)
    assert "confidence: a level in (0, 1), got 1.5" in problems
    assert any(p.startswith("stop_interval: 'x'") for p in problems)
    with pytest.raises(SpecError):
        resolve(CampaignSpec(margin=0.7))


def test_allocation_targets_match_the_formulas():
    # shrunk rates (k + 1/2) / (n + 1): 50.5/101 = 0.5 and 0.5/101
    k, n = [50, 0], [100, 100]
    p = [0.5, 0.5 / 101]
    assert adaptive.allocation_targets("uniform", 1001, [1, 1], k, n) == [501, 500]
    assert adaptive.allocation_targets("proportional", 1000, [1, 4], k, n) == [200, 800]
    assert adaptive.allocation_targets("neyman", 1000, [1, 4], k, n) == sfi.neyman_allocation(1000, [1, 4], p)
    assert adaptive.allocation_targets("equal-width", 1000, [1, 4], k, n) == sfi.round_to_total(
        [x * (1 - x) for x in p], 1000)


def test_allocated_campaign_spends_the_budget_pilot_first(tmp_path, direct):
    spec = CampaignSpec(sites=("neuron",), layers="16", bits="5,30", images=300, allocate="neyman", budget=700,
                        pilot=0.2, num_seeds=4, out=str(tmp_path), name="a")
    outcome = adaptive.run_allocated_campaign(spec)
    record = json.loads((tmp_path / "a" / adaptive.SFI_FILE).read_text())
    pilot, extra = (r["images"] for r in record["rounds"])
    assert pilot == {"neuron/16/5/flip": 70, "neuron/16/30/flip": 70}
    assert sum(pilot.values()) + sum(extra.values()) == 700 == outcome.injections
    # bit 30 of the logits fails often, bit 5 almost never: Neyman gives bit 30 nearly everything
    assert extra["neuron/16/30/flip"] > 5 * max(1, extra["neuron/16/5/flip"])
    import pandas as pd

    images = pd.read_parquet(tmp_path / "a" / "trials.parquet").groupby("bit")["images"].sum().to_dict()
    assert images == {5: 70 + extra["neuron/16/5/flip"], 30: 70 + extra["neuron/16/30/flip"]}
    again = adaptive.run_allocated_campaign(spec)  # resume: nothing left, the same allocation
    assert again.launched == 0 and json.loads((tmp_path / "a" / adaptive.SFI_FILE).read_text())["rounds"] == record["rounds"]


def test_allocation_refuses_too_few_seeds(tmp_path):
    from campaign.spec import SpecError

    spec = CampaignSpec(sites=("neuron",), layers="16", bits="30", images=300, allocate="uniform", budget=700,
                        num_seeds=2, out=str(tmp_path), name="a")
    with pytest.raises(SpecError, match="pass --num-seeds 4"):
        adaptive.run_allocated_campaign(spec)
    assert not (tmp_path / "a").exists()


def test_report_and_whole_model_of_a_margin_campaign(tmp_path, direct):
    import analysis.sfi as S
    from trainables.results import read_spec

    spec = CampaignSpec(sites=("neuron",), layers="0,16", bits="30,31", images=300, report_every=100, margin=0.1,
                        num_seeds=2, out=str(tmp_path), name="m")
    plan = resolve(spec)
    runner.record_spec(plan)  # the real spec.json (with its site sizes), as run_campaign writes it
    adaptive.run_margin_campaign(spec)
    runner.record_spec(plan)
    assert read_spec(tmp_path / "m")["site_sizes"]["neuron"] == {"0": ["Identity", 784], "16": ["Linear", 10]}
    table = S.strata(tmp_path / "m")
    est = S.whole_model(tmp_path / "m")
    weights = [784 if s == 0 else 10 for s in table["site_index"]]
    assert est == sfi.stratified_rate(table["mismatches"], table["golden_correct"], weights, 0.95)
    text = "\n".join(S.report_lines(tmp_path / "m"))  # the section `report` appends (analysis.report.run)
    assert "statistical fault injection (--margin +/-10 pp" in text
    spent = int(table["golden_correct"].sum())
    assert f"injections counted {spent:,} vs" in text and "whole-model neuron rate" in text
