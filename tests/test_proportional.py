"""Site sampling in proportion to size: each fault equals the fault its site's own trial draws."""
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.models_for_tests import make_data, plain_net, shared_relu_net
from trainables.inject import engine, proportional


def bench_for(model, n=200, batch_size=64):
    return engine.prepare(model, make_data(n), mode="fp32", batch_size=batch_size, device="cpu")


def per_site_oracle(bench, the_pool, kind, bit, seed, per=16):
    """For every image, the record of the per-site trial of the site the proportional trial picked."""
    if kind == "neuron":
        picks = proportional.draw_sites(seed, the_pool, np.arange(bench.num_images, dtype=np.uint64))
    else:
        picks = proportional.draw_sites(seed, the_pool, np.arange(bench.num_images, dtype=np.uint64) // per)
    full = {i: engine.run_faults(bench, s, kind, bit, seed, images_per_weight_fault=per, record="all").records
            for i, s in enumerate(the_pool.sites)}
    columns = ("position", "bit", "faulty", "changed", "nonfinite", "raw_before", "value_after", "fault_group")
    return picks, {c: np.array([getattr(full[p], c)[i] for i, p in enumerate(picks)]) for c in columns}


@pytest.mark.parametrize("kind,bit", [("neuron", "random"), ("neuron", 30), ("weight", "random"), ("param", 30)])
def test_each_fault_equals_the_fault_of_its_site_s_own_trial(kind, bit):
    bench = bench_for(plain_net())
    indices = [s.index for s in (bench.sites if kind != "param" else bench.params)
               if kind != "weight" or s.is_weight_site]
    the_pool = proportional.pool(bench, kind, indices)
    outcome = proportional.run_faults(bench, the_pool, kind, bit, seed=5, images_per_weight_fault=16, record="all")
    picks, oracle = per_site_oracle(bench, the_pool, kind, bit, 5)
    records = outcome.records
    assert records.site_index.tolist() == [the_pool.sites[p].index for p in picks]
    for column, expected in oracle.items():
        assert np.array_equal(getattr(records, column), expected, equal_nan=column == "value_after"), column
    assert outcome.counts.mismatches == int((records.changed & records.golden_correct).sum())
    assert outcome.counts.images == 200 and len(set(picks.tolist())) > 1


def test_sites_are_drawn_in_proportion_to_their_sizes():
    bench = bench_for(plain_net(), n=8)
    the_pool = proportional.pool(bench, "param", [p.index for p in bench.params])
    picks = proportional.draw_sites(11, the_pool, np.arange(200_000, dtype=np.uint64))
    shares = np.bincount(picks, minlength=len(the_pool.sites)) / len(picks)
    expected = np.array(the_pool.sizes) / the_pool.total
    # binomial standard errors: every share within 5 of them of its size's share
    assert np.all(np.abs(shares - expected) <= 5 * np.sqrt(expected * (1 - expected) / len(picks)) + 1e-12)


def test_windows_and_batch_sizes_give_the_same_faults():
    results = []
    for batch_size in (7, 64):
        bench = bench_for(shared_relu_net(), batch_size=batch_size)
        the_pool = proportional.pool(bench, "neuron", [s.index for s in bench.sites])
        parts = [proportional.run_faults(bench, the_pool, "neuron", "random", 3, a, b, record="all")
                 for a, b in [(0, 77), (77, 200)]]
        results.append((sum((p.counts for p in parts[1:]), parts[0].counts),
                        np.concatenate([p.records.site_index for p in parts]),
                        np.concatenate([p.records.faulty for p in parts])))
    assert np.array_equal(results[0][0].by_bit, results[1][0].by_bit)
    assert np.array_equal(results[0][1], results[1][1]) and np.array_equal(results[0][2], results[1][2])


def test_bad_pools_are_one_line():
    bench = bench_for(plain_net(), n=8)
    with pytest.raises(ValueError, match="neuron site 99 does not exist"):
        proportional.pool(bench, "neuron", [1, 99])
    with pytest.raises(ValueError, match="draws neuron, weight or param sites, not qparam"):
        proportional.pool(bench, "qparam", [1])


def test_a_proportional_campaign_has_one_trial_per_kind_and_bit_and_equals_the_engine(tmp_path):
    from analysis.sfi import whole_model
    from campaign.runner import settings_for
    from campaign.spec import CampaignSpec
    from tests.test_model_sources import _run_in_process
    from trainables.trial import CampaignSettings, workbench

    spec = CampaignSpec(model="demo:vgg", dataset="fashion-mnist", images=96, sites=("neuron", "weight"), layers="1-6",
                        bits="30,random", seeds=(7,), record="all", site_sampling="proportional",
                        images_per_weight_fault=32, out=str(tmp_path / "runs"), name="p")
    plan, (trials, faults) = _run_in_process(spec)
    assert sorted(trials["trial_key"]) == ["neuron-sall-b30-seed7", "neuron-sall-brandom-seed7",
                                           "weight-sall-b30-seed7", "weight-sall-brandom-seed7"]
    assert set(trials["site_index"]) == {-1} and set(trials["site_type"]) == {"proportional"}
    bench, _ = workbench(CampaignSettings.from_dict(settings_for(plan)), torch.device("cpu"))
    for row in trials.itertuples():
        the_pool = proportional.pool(bench, row.kind, plan.sites_by_kind[row.kind])
        assert row.site_name == f"proportional ({len(plan.sites_by_kind[row.kind])} {row.kind} sites)"
        oracle = proportional.run_faults(bench, the_pool, row.kind, 30 if row.bit == 30 else "random", 7,
                                         images_per_weight_fault=32, record="all")
        assert (row.mismatches, row.golden_correct) == (oracle.counts.mismatches, oracle.counts.golden_correct)
        mine = faults[faults["trial_key"] == row.trial_key]
        assert mine["site_index"].tolist() == oracle.records.site_index.tolist()
        assert mine["faulty"].tolist() == oracle.records.faulty.tolist()
    assert faults["site_index"].nunique() > 2  # each fault names the site it picked
    # the pool's population is the selected sites' sizes summed: the whole-model weights
    sizes = plan.site_sizes
    assert sizes[("weight", -1)][1] == sum(sizes[("weight", i)][1] for i in plan.sites_by_kind["weight"])
    estimate = whole_model(Path(plan.directory), kind="neuron")
    assert estimate.injections == int(trials[trials["kind"] == "neuron"]["golden_correct"].sum())


@pytest.mark.parametrize("changes,message", [
    ({"site_sampling": "even"}, "site_sampling: 'even': use per-site or proportional"),
    ({"sites": ("neuron", "qparam"), "quantize": "int8"}, "site_sampling: proportional draws neuron, weight and param"),
    ({"protect": "relu6"}, "site_sampling: proportional is not available with --quantize or --protect"),
])
def test_proportional_campaigns_refuse_what_they_cannot_do_in_one_line(changes, message, tmp_path):
    from campaign.spec import CampaignSpec, SpecError, resolve

    spec = CampaignSpec(model="demo:vgg", dataset="fashion-mnist", images=16, out=str(tmp_path),
                        **{"site_sampling": "proportional", **changes})
    with pytest.raises(SpecError, match=message):
        resolve(spec)
