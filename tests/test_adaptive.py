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
    rows = [run_trial(settings, TrialPoint(t.kind, t.site, t.bit, t.seed, t.fault, t.prior_k, t.prior_n))
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
