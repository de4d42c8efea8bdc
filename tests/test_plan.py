"""`python -m campaign plan`: strata, populations and injections per stratum (values, not timing)."""
import math

import pytest

from campaign.cli import main
from campaign.plan import make_plan, parse_budget, planning_rate
from campaign.spec import CampaignSpec, TrialPlan
from trainables import sfi
from trainables.results import check_and_aggregate, write_spec
from trainables.stats import wilson_interval
from trainables.trial import CampaignSettings, TrialPoint, run_trial

SPEC = dict(model="demo:vgg", sites=("neuron",), layers="0,16", bits="30,31", images=200, num_seeds=2)


@pytest.fixture(scope="module")
def plan():
    return make_plan(CampaignSpec(**SPEC), margin=0.01, confidence=0.99, calibrate_images=0)


def test_plan_sizes_each_site_bit_stratum(plan):
    c = plan.golden_correct
    assert 0 < c <= 200 and plan.images == 200
    assert [(s.kind, s.key, s.bit) for s in plan.strata] == [("neuron", "0", "30"), ("neuron", "0", "31"),
                                                             ("neuron", "16", "30"), ("neuron", "16", "31")]
    # site 0 is the 1x28x28 image, site 16 the 10 logits; one fixed bit per stratum
    assert [s.population for s in plan.strata] == [784 * c, 784 * c, 10 * c, 10 * c]
    t2 = 2.5758293035489004 ** 2 * 0.25 / 0.01**2  # Leveugle, p = 0.5, by hand
    assert [s.needed for s in plan.strata] == [math.ceil(N / (1 + (N - 1) / t2)) for N in (784 * c, 784 * c, 10 * c, 10 * c)]
    assert all(s.spec_injections == 2 * c for s in plan.strata)  # two seeds, one trial each
    assert plan.strata[0].spec_margin == pytest.approx(2.5758293 * math.sqrt(0.25 / (2 * c) * (784 * c - 2 * c) / (784 * c - 1)))
    # looks every --report-every images (2048: here the whole 200-image trial, c counted injections)
    assert plan.strata[0].needed_cs == math.ceil(sfi.cs_sample_size(0.01, 0.99, 0.5) / c) * c
    assert plan.strata[2].needed_cs == 10 * c  # capped at the population
    assert plan.seconds(lambda s: s.needed) is None  # not calibrated


def test_plan_by_site_and_type_pools_the_bits():
    by_site = make_plan(CampaignSpec(**SPEC), 0.02, 0.95, by="site", calibrate_images=0)
    c = by_site.golden_correct
    assert [(s.key, s.units, s.population) for s in by_site.strata] == [("0", 2, 2 * 784 * c), ("16", 2, 2 * 10 * c)]
    by_type = make_plan(CampaignSpec(**{**SPEC, "layers": "0,15,16"}), 0.02, 0.95, by="type", calibrate_images=0)
    assert [s.key for s in by_type.strata] == ["Identity", "Dropout", "Linear"]


def test_budget_buys_a_margin_split_evenly():
    plan = make_plan(CampaignSpec(**SPEC), 0.01, 0.99, budget="4000", calibrate_images=0)
    assert plan.budget_injections == 4000
    assert plan.budget_margins[0] == pytest.approx(sfi.leveugle_margin(1000, plan.strata[0].population, 0.99, 0.5))
    assert parse_budget("2h") == (None, 7200.0) and parse_budget("2e6") == (2_000_000, None)


def test_prior_campaign_sets_the_planning_rate(tmp_path):
    settings = CampaignSettings(name="prior", directory=str(tmp_path), model="demo:vgg", dataset="fashion-mnist",
                                images=200, report_every=200)
    points = [TrialPoint("neuron", 16, 30, 5), TrialPoint("neuron", 16, 31, 5)]
    rows = [run_trial(settings, p) for p in points]
    write_spec(tmp_path, {"name": "prior"})
    check_and_aggregate(tmp_path, {p.key: TrialPlan(p.kind, p.site, p.bit, p.seed) for p in points})
    plan = make_plan(CampaignSpec(**SPEC), 0.01, 0.99, prior=str(tmp_path), calibrate_images=0)
    low, high = wilson_interval(rows[0]["mismatches"], rows[0]["golden_correct"])
    expected = min(max(0.5, low), high)
    s = plan.strata[2]
    assert s.prior == f"prior {rows[0]['mismatches']}/{rows[0]['golden_correct']}" and s.rate == expected
    assert s.needed == sfi.leveugle_sample_size(s.population, 0.01, 0.99, expected)
    assert plan.strata[0].prior == "p=0.5"  # site 0 is not in the prior
    assert planning_rate((0, 1000)) == (wilson_interval(0, 1000)[1], "prior 0/1000")


@pytest.mark.parametrize("flags,message", [
    (["--margin", "0.7"], "margin: a half-width in (0, 0.5)"),
    (["--confidence", "1"], "confidence: a level in (0, 1)"),
    (["--by", "bit"], "by: 'bit': use one of trial, site, type"),
    (["--budget", "lots"], "budget: 'lots': give injections"),
])
def test_plan_refuses_bad_flags_in_one_line_before_loading(flags, message, capsys):
    assert main(["plan", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_plan_prints_the_table(capsys):
    assert main(["plan", "--sites", "neuron", "--layers", "16", "--bits", "30", "--images", "200",
                 "--calibrate-images", "0", "--margin", "0.05", "--confidence", "0.95"]) == 0
    out = capsys.readouterr().out
    assert "plan of demo:vgg: margin +/-5 pp at 95% confidence" in out
    assert "strata: 1 (0 with a prior rate)" in out


def test_time_estimate_adds_the_overhead_of_each_trial(plan):
    import dataclasses

    from campaign.plan import RAY_START_S

    assert plan.start_s == RAY_START_S  # a local cluster is started (no --address)
    timed = dataclasses.replace(plan, strata=tuple(dataclasses.replace(s, seconds_per_injection=1e-3) for s in plan.strata),
                                setup_s=2.0, slots=2, trial_overhead_s=0.5, start_s=3.0)
    c = plan.golden_correct
    # the spec as given: 2 seeds x 4 strata = 8 trials of c injections, then the setup and Ray's start
    assert timed.seconds(lambda s: s.spec_injections) == pytest.approx((8 * c * 1e-3 + 8 * 0.5) / 2 + 2.0 + 3.0)
