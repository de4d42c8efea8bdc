"""Fault models beyond one flip (flip:K, burst:K, stuck0/1, random, zero) against bitstring
applied by hand, through the engine's neuron and weight paths, on edge values."""
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from bitstring import BitArray
from torch import nn

import analysis
from analysis import report, tables
from trainables.inject import engine, fault_models
from trainables.inject.bitflip import INT_VIEW, apply_fault, dtype_width
from trainables.inject.fault_models import FaultModel, parse_fault, parse_faults
from trainables.inject.faults import random_words, sample_faults
from campaign.cli import build_parser, spec_from_args
from campaign.spec import CampaignSpec, SpecError, resolve, spec_from_yaml
from trainables import results as R
from trainables.trial import CampaignSettings, TrialPoint, run_trial

MODES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODELS = ["flip", "flip:3", "burst:2", "burst:5", "stuck0", "stuck1", "random", "zero"]


def edge_values(dtype):
    info = torch.finfo(dtype)
    tiny = info.smallest_normal * info.eps  # the smallest subnormal
    return [0.0, -0.0, tiny, -tiny, info.smallest_normal, info.max, -info.max, math.inf, -math.inf, math.nan,
            1.0, -1.5, 3.140625]


class Recorder(nn.Module):
    """Keeps what it receives (the faulty input site 0); its logits ignore the values."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.anchor = nn.Linear(1, 2)  # gives the model a dtype and a weight site

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.anchor.bias.expand(x.shape[0], 2) + 0 * self.anchor.weight.sum()


def oracle(before: int, width: int, fault: FaultModel, targets: int, word: int) -> int:
    """The faulty bits, made by hand on a bitstring (MSB-first indexing)."""
    bits = BitArray(uint=before, length=width)
    positions = [width - 1 - b for b in range(width) if targets >> b & 1]
    if fault.name in ("flip", "burst"):
        bits.invert(positions)
    elif fault.name in ("stuck0", "stuck1"):
        bits.set(fault.name == "stuck1", positions)
    elif fault.name == "random":
        bits = BitArray(uint=word, length=width)
    else:
        bits = BitArray(uint=0, length=width)
    return bits.uint


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", MODELS)
def test_neuron_faults_on_edge_values_match_bitstring(mode, name):
    """Each image is one edge value; the engine faults it (input site 0) and the model sees
    exactly the bits bitstring makes by hand from the sampled targets."""
    dtype, fault = MODES[mode], parse_fault(name)
    width = dtype_width(dtype)
    values = torch.tensor(edge_values(dtype) * 4, dtype=torch.float64).to(dtype).reshape(-1, 1)
    n = values.shape[0]
    model = Recorder()
    bench = engine.prepare(model, (values, torch.zeros(n, dtype=torch.int64)), mode=mode, batch_size=16, device="cpu")
    model.seen.clear()
    bit = 3 if name in ("stuck0", "stuck1") and mode == "fp32" else "random"  # one fixed-bit case too
    out = engine.run_faults(bench, bench.sites[0], "neuron", bit, seed=7, record="all", fault=name)
    seen = torch.cat(model.seen).reshape(-1)
    mask = (1 << width) - 1
    before = [int(v) & mask for v in values.reshape(-1).view(INT_VIEW[dtype]).tolist()]
    after = [int(v) & mask for v in seen.view(INT_VIEW[dtype]).tolist()]
    words = random_words(7, "neuron", 0, "value", np.arange(n, dtype=np.uint64)).tolist()
    r = out.records
    for i in range(n):
        targets = int(r.fault_mask[i]) & mask
        assert oracle(before[i], width, fault, targets, int(words[i]) & mask) == after[i], (i, name)
        assert (int(r.raw_before[i]) & mask) == before[i]
        assert bool(r.effective[i]) == (after[i] != before[i])
        expected_after = seen[i].double().item()
        assert r.value_after[i] == expected_after or (math.isnan(r.value_after[i]) and math.isnan(expected_after))
        # the first bit is the lowest targeted bit; the targets have the model's shape
        assert r.bit[i] == (targets & -targets).bit_length() - 1
        count = bin(targets).count("1")
        if fault.name == "flip":
            assert count == fault.k
        elif fault.name == "burst":
            assert targets == ((1 << fault.k) - 1) << r.bit[i] & mask  # adjacent, clipped to the width
        elif fault.whole_element:
            assert targets == mask and r.bit[i] == 0
        else:
            assert count == 1
    assert out.counts.total("effective") == int(np.sum(r.effective))
    if name in ("stuck0", "stuck1") and bit == 3:
        assert set(r.bit.tolist()) == {3}
    # the data set itself is never modified
    assert torch.equal(bench.images.view(INT_VIEW[dtype]), values.view(INT_VIEW[dtype]))


def test_stuck_at_on_a_bit_already_there_changes_nothing_and_is_counted_not_effective():
    values = torch.full((40, 1), 1.0)  # fp32 1.0: bit 0 is 0, bit 29 is 1
    model = Recorder()
    bench = engine.prepare(model, (values, torch.zeros(40, dtype=torch.int64)), batch_size=16, device="cpu")
    site = bench.sites[0]
    for name, bit, effective in (("stuck0", 0, 0), ("stuck1", 29, 0), ("stuck1", 0, 40), ("stuck0", 29, 40), ("flip", 0, 40)):
        model.seen.clear()
        out = engine.run_faults(bench, site, "neuron", bit, seed=1, record="all", fault=name)
        assert out.counts.images == 40 and out.counts.total("effective") == effective, (name, bit)
        assert out.counts.by_bit[engine.COUNT_FIELDS.index("effective"), bit] == effective
        assert out.records.effective.tolist() == [effective == 40] * 40
        assert torch.equal(torch.cat(model.seen), values) == (effective == 0)


@pytest.mark.parametrize("name", ["burst:3", "stuck1", "random", "zero"])
def test_weight_faults_match_bitstring_and_restore_the_weight_bit_for_bit(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():
        model[1].weight[0, :4] = torch.tensor([math.nan, -0.0, math.inf, 1e-45])
    images = torch.randn(96, 6)
    bench = engine.prepare(model, (images, torch.zeros(96, dtype=torch.int64)), batch_size=8, device="cpu")
    weight = model[1].weight.detach()
    saved = weight.clone().view(torch.int32)
    site = bench.site("weight", 2)
    out = engine.run_faults(bench, site, "weight", "random", seed=3, images_per_weight_fault=16, record="all", fault=name)
    assert torch.equal(weight.view(torch.int32), saved)  # restored bit for bit (NaN included)
    r, fault = out.records, parse_fault(name)
    groups = sample_faults(3, "weight", 2, "random", 32, 18, 0, 6)
    words = random_words(3, "weight", 2, "value", np.arange(6, dtype=np.uint64)).tolist()
    mask = 2**32 - 1
    for i in range(96):
        g = i // 16
        assert r.position[i] == groups.positions[g] and r.fault_group[i] == g
        before = int(saved.reshape(-1)[groups.positions[g]]) & mask
        assert int(r.raw_before[i]) & mask == before
        expected = oracle(before, 32, fault, int(r.fault_mask[i]) & mask, int(words[g]) & mask)
        got = torch.tensor([r.value_after[i]], dtype=torch.float64).float().view(torch.int32).item() & mask
        if not math.isnan(r.value_after[i]):  # a NaN's payload does not survive the float64 column
            assert got == expected
        assert bool(r.effective[i]) == (expected != before)
    # the same faults computed by hand through the model give the same predictions
    for g in range(6):
        with torch.no_grad():
            faulty = saved.clone().reshape(-1)
            faulty[groups.positions[g]] = apply_fault(faulty[groups.positions[g]], *_masks(fault, 3, g))
            logits = nn.functional.linear(images[g * 16 : (g + 1) * 16], faulty.view(torch.float32).reshape(3, 6),
                                          model[1].bias)
        assert r.faulty[g * 16 : (g + 1) * 16].tolist() == logits.argmax(1).tolist()


def _masks(fault, seed, g):
    f = fault_models.sample(seed, "weight", 2, "random", 32, 18, g, g + 1, fault)
    keep = None if f.keep is None else torch.tensor(f.keep).to(torch.int32)[0]
    return keep, torch.tensor(f.toggle).to(torch.int32)[0]


def test_flip_draws_are_today_s_and_other_models_share_positions_and_bits():
    base = sample_faults(0, "neuron", 1, "random", 32, 1000, 0, 5)
    flip = fault_models.sample(0, "neuron", 1, "random", 32, 1000, 0, 5)
    assert flip.positions.tolist() == [567, 895, 786, 322, 234] and flip.bits.tolist() == [9, 9, 8, 18, 29]
    assert flip.keep is None and flip.toggle.tolist() == [1 << b for b in base.bits.tolist()]
    assert fault_models.sample(0, "neuron", 1, 31, 32, 1000, 0, 2).toggle.tolist() == [-(2**31)] * 2  # signed int32
    for name in ("stuck0", "stuck1", "burst:2", "flip:3", "random"):
        other = fault_models.sample(0, "neuron", 1, "random", 32, 1000, 0, 5, parse_fault(name))
        assert other.positions.tolist() == base.positions.tolist()
        if name in ("stuck0", "stuck1", "burst:2"):
            assert other.bits.tolist() == base.bits.tolist()


def test_flip_k_draws_are_distinct_uniform_and_independent_of_the_cut():
    f = fault_models.sample(4, "neuron", 2, "random", 16, 10, 0, 8000, parse_fault("flip:3"))
    targets = f.toggle.astype(np.int64) & 0xFFFF
    assert all(bin(t).count("1") == 3 for t in targets.tolist())
    per_bit = np.array([(targets >> b & 1).sum() for b in range(16)])
    assert np.all(np.abs(per_bit - 1500) < 200), per_bit  # 3/16 of 8000 each; sigma ~ 35
    assert f.bits.tolist() == [(t & -t).bit_length() - 1 for t in targets.tolist()]
    parts = [fault_models.sample(4, "neuron", 2, "random", 16, 10, a, b, parse_fault("flip:3")) for a, b in ((0, 3), (3, 8000))]
    assert np.array_equal(np.concatenate([p.toggle for p in parts]), f.toggle)
    fixed = fault_models.sample(4, "neuron", 2, 12, 16, 10, 0, 500, parse_fault("flip:3"))
    assert set(fixed.bits.tolist()) == {12}  # the given bit is the lowest; two more above it
    assert all(bin(t & 0xFFFF).count("1") == 3 and (t & 0xFFFF) >> 12 << 12 == t & 0xFFFF for t in fixed.toggle.tolist())
    clipped = fault_models.sample(4, "neuron", 2, 14, 16, 10, 0, 50, parse_fault("flip:3"))
    assert set((clipped.toggle & 0xFFFF).tolist()) == {0xC000}  # only bits 14 and 15 are left


@pytest.mark.parametrize("text,message", [
    ("burst:0", "K must be a positive integer"), ("flip:x", "K must be a positive integer"),
    ("stuck1:2", "takes no bit count"), ("bitflip", "unknown fault model"), ("flip,flip:1", "listed twice"),
])
def test_bad_fault_models_are_one_line(text, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_faults(text)
    assert "\n" not in str(err.value)


def test_engine_refuses_k_beyond_the_width_and_a_bit_for_whole_element_models():
    bench = engine.prepare(Recorder(), (torch.ones(4, 1, dtype=torch.float64).half(), torch.zeros(4, dtype=torch.int64)),
                           mode="fp16", device="cpu")
    with pytest.raises(ValueError, match=r"burst:17 needs 17 bits but an element has 16: K must be 1\.\.16"):
        engine.run_faults(bench, bench.sites[0], "neuron", "random", seed=1, fault="burst:17")
    with pytest.raises(ValueError, match="takes no bit position"):
        engine.run_faults(bench, bench.sites[0], "neuron", 3, seed=1, fault="zero")
    assert [str(parse_fault(t)) for t in ("flip:1", "burst:1", "FLIP:2", "Stuck0")] == ["flip", "flip", "flip:2", "stuck0"]


@pytest.fixture(scope="module")
def fault_campaign(tmp_path_factory):
    """Four trials of demo:vgg run directly (no Ray): flip, burst:2 and zero on neuron site 3,
    stuck0 on weight site 1; written, committed and aggregated as a campaign does."""
    directory = tmp_path_factory.mktemp("faults")
    settings = CampaignSettings(name="fm", directory=str(directory), model="demo:vgg", dataset="fashion-mnist",
                                images=300, report_every=300, record="all")
    points = [TrialPoint("neuron", 3, 30, 5), TrialPoint("neuron", 3, 30, 5, "burst:2"),
              TrialPoint("weight", 1, 30, 5, "stuck0"), TrialPoint("neuron", 3, "random", 5, "zero")]
    rows = {p.fault: run_trial(settings, p) for p in points}
    R.write_spec(directory, {"name": "fm", "seeds": [5]})
    R.aggregate(directory)
    return directory, rows


def test_trial_records_the_fault_model_and_keys_it_only_when_not_flip(fault_campaign):
    directory, rows = fault_campaign
    flip, burst, stuck = rows["flip"], rows["burst:2"], rows["stuck0"]
    assert flip["trial_key"] == "neuron-s0003-b30-seed5" and flip["fault"] == "flip" and flip["effective"] == 300
    assert burst["trial_key"] == "neuron-s0003-b30-seed5-burst2" and burst["fault"] == "burst:2"
    assert stuck["trial_key"] == "weight-s0001-b30-seed5-stuck0" and stuck["effective"] < 300
    assert rows["zero"]["trial_key"] == "neuron-s0003-brandom-seed5-zero"
    faults = pd.read_parquet(directory / "faults")
    assert faults.groupby("trial_key")["fault"].unique().map(list).to_dict() == {
        "neuron-s0003-b30-seed5": ["flip"], "neuron-s0003-b30-seed5-burst2": ["burst:2"],
        "weight-s0001-b30-seed5-stuck0": ["stuck0"], "neuron-s0003-brandom-seed5-zero": ["zero"]}
    b = faults[faults.trial_key == "neuron-s0003-b30-seed5-burst2"]
    assert set(b.bit) == {30} and set(b.fault_mask) == {-(2**31) | 2**30}  # bits 30 and 31, signed like raw_before
    f = faults[faults.trial_key == "neuron-s0003-b30-seed5"]
    assert f.position.tolist() == b.position.tolist()  # same elements: paired with the flip
    s = faults[faults.trial_key == "weight-s0001-b30-seed5-stuck0"]
    assert s.effective.sum() == stuck["effective"] and (s.value_after[~s.effective] == s.value_before[~s.effective]).all()
    z = faults[faults.trial_key == "neuron-s0003-brandom-seed5-zero"]
    assert (z.value_after == 0).all() and set(z.bit) == {0} and z.effective.sum() == rows["zero"]["effective"]
    bits = pd.read_parquet(directory / R.BITS_FILE).set_index("trial_key")
    assert bits.loc["weight-s0001-b30-seed5-stuck0", "effective"] == stuck["effective"]


def test_analysis_groups_by_fault_model_and_never_pools_them(fault_campaign):
    directory, rows = fault_campaign
    trials = analysis.load(directory)
    assert sorted(trials["fault"].astype(str)) == ["burst:2", "flip", "stuck0", "zero"]
    site = analysis.per_site(trials)
    neuron = site[site["kind"] == "neuron"].set_index("fault")
    assert list(site.columns[:5]) == ["model", "dataset", "mode", "kind", "fault"]
    for name in ("flip", "burst:2", "zero"):  # one row each, with that trial's own counts
        assert neuron.loc[name, "trials"] == 1 and neuron.loc[name, "mismatches"] == rows[name]["mismatches"]
    bit = analysis.per_bit(directory)
    assert set(bit["fault"].astype(str)) == {"flip", "burst:2", "stuck0"}  # zero has no bit position
    assert set(bit.loc[bit["fault"] == "burst:2", "bit"]) == {30}
    titles = [tables.group_title(ident, r) for ident, r in tables.groups(bit)]
    assert "demo:vgg / fashion-mnist / fp32 / neuron burst:2 faults (bit: 30; per-bit rows count each fault under its lowest bit)" in titles
    assert "demo:vgg / fashion-mnist / fp32 / neuron flip faults (bit: 30)" in titles
    flip_bits = analysis.per_bit(analysis.load_bits(directory).query("fault == 'flip'"))
    assert [tables.group_title(i, r) for i, r in tables.groups(flip_bits)] == [
        "demo:vgg / fashion-mnist / fp32 / neuron faults (bit: 30)"]  # flip alone: today's title and columns
    flip_only = analysis.per_site(trials[trials["fault"] == "flip"])
    assert "fault" not in flip_only.columns  # today's tables keep their columns
    lines = report.format_table(bit, ["bit", "field"])  # what `campaign report` prints (without its plots)
    assert sum("faults (bit: 30" in line for line in lines) == 3
    assert any("random and zero replace every bit" in line for line in report._fault_model_note(trials))
    assert report._fault_model_note(trials[trials["fault"] == "flip"]) == []
    assert "weight stuck0 faults" in report._summary(trials)[0]


def test_fault_is_a_campaign_dimension_from_flags_and_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("model: demo:vgg\nfault: [flip, BURST:2]\n")
    assert spec_from_yaml(tmp_path / "c.yaml").fault == "flip,burst:2"
    args = build_parser().parse_args(["run", "--fault", "stuck1,zero", "--bits", "random,30"])
    spec = spec_from_args(args, env={})
    plan = resolve(dataclasses.replace(spec, sites=("neuron",), layers="1,2", weights="none", images=16))
    assert [(t.site, t.bit, t.fault) for t in plan.trials] == [
        (1, "random", "stuck1"), (1, 30, "stuck1"), (1, "random", "zero"),  # zero takes no bit: once per site and seed
        (2, "random", "stuck1"), (2, 30, "stuck1"), (2, "random", "zero")]
    assert plan.identity()["fault"] == "stuck1,zero"
    flip = resolve(CampaignSpec(model="demo:vgg", sites=("neuron",), layers="1", weights="none", images=16, fault="flip:1"))
    assert flip.identity()["fault"] is None and flip.trials[0].fault == "flip"  # today's identity and keys


@pytest.mark.parametrize("changes,message", [
    (dict(fault="burst:17", dtype="fp16"), r"fault: fault model burst:17 needs 17 bits but an element has 16"),
    (dict(fault="zero", bits="30"), r"fault: zero replaces every bit .* use bits random, not 30"),
    (dict(fault="stuck"), r"fault: unknown fault model 'stuck'"),
])
def test_bad_fault_specs_fail_before_anything_runs(tmp_path, changes, message):
    spec = CampaignSpec(model="demo:vgg", sites=("neuron",), layers="1", weights="none", images=16, out=str(tmp_path),
                        **changes)
    with pytest.raises(SpecError, match=message) as err:
        resolve(spec)
    assert len(str(err.value).splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_prefix_reuse_gives_the_same_faults_for_other_fault_models():
    from trainables.zoo.data import load_dataset
    from trainables.zoo.models import load_model

    data = load_dataset("fashion-mnist", limit=128)
    bench = engine.prepare(load_model("demo:vgg", num_classes=10), (data.images, data.labels), batch_size=64,
                           device="cpu", prefix=True)
    for kind, site, name in (("neuron", 4, "burst:2"), ("weight", 5, "stuck1")):
        s = bench.site(kind, site)
        runs = [engine.run_faults(bench, s, kind, "random", 4, record="all", images_per_weight_fault=32, prefix=p, fault=name)
                for p in (False, True)]
        assert [r.path for r in runs] == ["full", "prefix"]
        full, pre = (r.records for r in runs)
        assert np.array_equal(runs[0].counts.by_bit, runs[1].counts.by_bit)
        for column in ("faulty", "raw_before", "fault_mask", "effective"):
            assert np.array_equal(getattr(full, column), getattr(pre, column)), column
        assert np.array_equal(full.value_after, pre.value_after, equal_nan=True)
