"""Bit pools (``--bits random:<pool>``): one bit spec whose faults draw their bit(s) uniformly
from a set of bits; counter-based like every draw, ``random:0-31`` on fp32 == ``random``."""
import collections
import dataclasses
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from bitstring import BitArray
from torch import nn

import analysis
from campaign.spec import CampaignSpec, SpecError, parse_bits, resolve, spec_from_yaml
from trainables import results as R
from trainables.inject import engine, fault_models
from trainables.inject.bitflip import INT_VIEW
from trainables.inject.bitpools import BitPool, key_text, parse_pool
from trainables.inject.fault_models import parse_fault
from trainables.inject.faults import parse_bit_spec, sample_faults
from trainables.trial import CampaignSettings, TrialPoint, run_trial


def pool(text: str, layout: str = "fp32", width: int = 32) -> BitPool:
    return parse_pool(text).resolve(layout, width)


def bit_sets(toggles, width: int) -> list[tuple[int, ...]]:
    """The bits each toggle mask (signed, ``width`` bits) targets, ascending."""
    return [tuple(b for b in range(width) if int(t) >> b & 1) for t in toggles]


# ---------------------------------------------------------------- syntax


@pytest.mark.parametrize("text,canonical,key", [
    ("random:23-30", "random:23-30", "random23-30"),
    ("random:30+23-29", "random:23-30", "random23-30"),  # merged and sorted: equal pools, equal keys
    ("Random:25+23+30", "random:23+25+30", "random23_25_30"),
    ("random:exponent+31", "random:exponent+31", "randomexponent_31"),
    ("random:mantissa+sign", "random:sign+mantissa", "randomsign_mantissa"),
])
def test_pool_text_is_canonical_and_its_key_is_file_safe(text, canonical, key):
    assert str(parse_bit_spec(text)) == canonical and key_text(text) == key
    assert R.trial_key("neuron", 5, text, 17) == f"neuron-s0005-b{key}-seed17"
    assert R.trial_key("weight", 2, text, 3, "flip:2") == f"weight-s0002-b{key}-seed3-flip2"


def test_plain_bit_specs_and_keys_are_unchanged():
    assert [parse_bit_spec(v) for v in ("random", "-1", None, "30", 7)] == ["random", "random", "random", 30, 7]
    assert R.trial_key("neuron", 5, "random", 17) == "neuron-s0005-brandom-seed17"
    assert R.trial_key("neuron", 5, 23, 17, "burst:2") == "neuron-s0005-b23-seed17-burst2"
    assert parse_bits("random,23,30", 32) == ["random", 23, 30]
    assert parse_bits("random:23-30,30,random:exponent", 32) == ["random:23-30", 30, "random:exponent"]


@pytest.mark.parametrize("text,message", [
    ("random:", "bit pool 'random:' is empty"),
    ("random:30-23", "range 30-23 is reversed: write 23-30"),
    ("random:exponant", "cannot read 'exponant'"),
    ("random:23,25", "join a pool's bits with +, as in random:23+25"),
    ("random:23", "holds one bit: write 23 for a fixed bit"),  # what 'random:23,25' gives once commas split it
])
def test_bad_pools_are_one_line(text, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        parse_bit_spec(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("layout,field,bits", [
    ("fp32", "exponent", range(23, 31)), ("fp32", "mantissa", range(23)), ("fp16", "exponent", range(10, 15)),
    ("bf16", "exponent", range(7, 15)), ("fp8_e4m3fn", "exponent", range(3, 7)), ("fp8_e5m2", "exponent", range(2, 7)),
    ("fp8_e5m2", "mantissa", range(2)), ("int8", "sign", [7]), ("int8", "magnitude", range(7)),
    ("uint8", "magnitude", range(8)), ("int32", "sign", [31]), ("int32", "magnitude", range(31)),
])
def test_fields_resolve_per_format(layout, field, bits):
    width = 8 if "8" in layout else 16 if layout in ("fp16", "bf16") else 32
    assert pool(f"random:{field}", layout, width).bits == tuple(bits)


@pytest.mark.parametrize("layout,width,text,message", [
    ("uint8", 8, "random:sign", r"uint8 \(quint8 activation codes\) has no sign field \(its fields: magnitude 7-0\)"),
    ("int32", 32, "random:exponent", r"int32 \(zero points\) has no exponent field \(its fields: sign 31, magnitude 30-0\)"),
    ("fp32", 32, "random:magnitude", "fp32 has no magnitude field"),
    ("fp8_e4m3fn", 8, "random:2-8", "bit 8 is outside a 8-bit element: allowed 0..7"),
])
def test_a_pool_the_format_cannot_hold_is_one_line(layout, width, text, message):
    with pytest.raises(ValueError, match=message) as err:
        pool(text, layout, width)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- draws


def test_random_0_31_draws_exactly_what_random_draws_on_fp32():
    whole = parse_bit_spec("random:0-31")
    for name in ("flip", "flip:3", "burst:2", "stuck0", "stuck1"):
        fault = parse_fault(name)
        a = fault_models.sample(5, "neuron", 3, "random", 32, 1000, 0, 3000, fault)
        b = fault_models.sample(5, "neuron", 3, whole, 32, 1000, 0, 3000, fault)
        assert np.array_equal(a.positions, b.positions) and np.array_equal(a.bits, b.bits), name
        assert np.array_equal(a.toggle, b.toggle) and (a.keep is None) == (b.keep is None), name
    half = fault_models.sample(2, "weight", 1, pool("random:0-15", "fp16", 16), 16, 77, 0, 500)
    assert np.array_equal(half.bits, sample_faults(2, "weight", 1, "random", 16, 77, 0, 500).bits)


def test_pool_draws_stay_in_the_pool_cover_it_and_keep_the_positions():
    exponent = pool("random:exponent")
    f = fault_models.sample(5, "neuron", 3, exponent, 32, 1000, 0, 4000)
    assert f.bits[:8].tolist() == [29, 29, 24, 26, 29, 27, 30, 29]
    assert sorted(collections.Counter(f.bits.tolist()).items()) == [
        (23, 528), (24, 485), (25, 499), (26, 519), (27, 449), (28, 492), (29, 499), (30, 529)]
    flip = sample_faults(5, "neuron", 3, "random", 32, 1000, 0, 4000)
    assert np.array_equal(f.positions, flip.positions)  # same elements as every other bit spec: paired
    gappy = fault_models.sample(8, "weight", 0, pool("random:0+7+31"), 32, 10, 0, 300, parse_fault("stuck1"))
    assert set(gappy.bits.tolist()) == {0, 7, 31} and set(bit_sets(gappy.toggle, 32)) == {(0,), (7,), (31,)}
    burst = fault_models.sample(8, "weight", 0, pool("random:29-31"), 32, 10, 0, 300, parse_fault("burst:2"))
    assert set(bit_sets(burst.toggle, 32)) == {(29, 30), (30, 31), (31,)}  # start from the pool, clipped to the width
    parts = [fault_models.sample(5, "neuron", 3, exponent, 32, 1000, a, b, parse_fault("flip:3")) for a, b in ((0, 7), (7, 900))]
    whole = fault_models.sample(5, "neuron", 3, exponent, 32, 1000, 0, 900, parse_fault("flip:3"))
    assert np.array_equal(np.concatenate([p.toggle for p in parts]), whole.toggle)  # counter-based: any cut


def test_flip_k_draws_a_uniform_k_subset_of_the_pool():
    f = fault_models.sample(11, "weight", 2, pool("random:3+5+9+12", "fp16", 16), 16, 50, 0, 6000, parse_fault("flip:2"))
    subsets = bit_sets(f.toggle, 16)
    assert subsets[:5] == [(3, 9), (5, 12), (3, 5), (3, 5), (5, 9)] and f.bits[:5].tolist() == [3, 5, 3, 3, 5]
    assert sorted(collections.Counter(subsets).items()) == [  # each of the 6 pairs about 1000 times
        ((3, 5), 1031), ((3, 9), 1017), ((3, 12), 988), ((5, 9), 1005), ((5, 12), 976), ((9, 12), 983)]
    assert f.bits.tolist() == [s[0] for s in subsets]  # the first (lowest) bit, as per-bit tables count it
    # plain random flip:K is a uniform K-subset of the width: all 120 pairs of 16 bits, 100 expected each
    counts = collections.Counter(bit_sets(fault_models.sample(4, "neuron", 2, "random", 16, 10, 0, 12000,
                                                              parse_fault("flip:2")).toggle, 16))
    assert len(counts) == 120 and (min(counts.values()), max(counts.values())) == (75, 131)


def test_flip_k_beyond_the_pool_and_pools_for_whole_element_models_are_refused():
    with pytest.raises(ValueError, match=r"flip:3 needs 3 distinct bits but bit pool random:23\+30 holds 2 in a 32-bit "
                                         r"element: K must be 1\.\.2"):
        fault_models.sample(1, "neuron", 0, pool("random:23+30"), 32, 10, 0, 5, parse_fault("flip:3"))
    with pytest.raises(ValueError, match="takes no bit position: use bits 'random', not 'random:23-30'"):
        fault_models.sample(1, "neuron", 0, pool("random:23-30"), 32, 10, 0, 5, parse_fault("zero"))
    with pytest.raises(ValueError, match="names fields: resolve it for the element's format first"):
        fault_models.sample(1, "neuron", 0, parse_pool("random:exponent"), 32, 10, 0, 5)


class Recorder(nn.Module):
    """Keeps what it receives (the faulty input site 0); its logits ignore the values."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.anchor = nn.Linear(1, 2)

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.anchor.bias.expand(x.shape[0], 2) + 0 * self.anchor.weight.sum()


@pytest.mark.parametrize("mode,dtype,exponent", [("fp32", torch.float32, range(23, 31)), ("fp16", torch.float16, range(10, 15)),
                                                 ("bf16", torch.bfloat16, range(7, 15))])
def test_flip2_among_exponent_bits_matches_bitstring_on_edge_values(mode, dtype, exponent):
    info = torch.finfo(dtype)
    edges = [0.0, -0.0, info.smallest_normal * info.eps, info.smallest_normal, info.max, -info.max, math.inf,
             -math.inf, math.nan, 1.0, -1.5]
    values = torch.tensor(edges * 6, dtype=torch.float64).to(dtype).reshape(-1, 1)
    n, width = values.shape[0], torch.finfo(dtype).bits
    model = Recorder()
    bench = engine.prepare(model, (values, torch.zeros(n, dtype=torch.int64)), mode=mode, batch_size=16, device="cpu")
    model.seen.clear()
    out = engine.run_faults(bench, bench.sites[0], "neuron", parse_bit_spec("random:exponent"), seed=3, record="all",
                            fault="flip:2")
    mask = (1 << width) - 1
    before = [int(v) & mask for v in values.reshape(-1).view(INT_VIEW[dtype]).tolist()]
    after = [int(v) & mask for v in torch.cat(model.seen).reshape(-1).view(INT_VIEW[dtype]).tolist()]
    targets = bit_sets(out.records.fault_mask, width)
    for i in range(n):
        assert len(targets[i]) == 2 and set(targets[i]) <= set(exponent), targets[i]
        bits = BitArray(uint=before[i], length=width)
        bits.invert([width - 1 - b for b in targets[i]])  # bitstring is MSB-first
        assert bits.uint == after[i] and out.records.bit[i] == targets[i][0]
    assert {b for t in targets for b in t} == set(exponent)  # every bit of the pool is hit


# ---------------------------------------------------------------- campaigns


def test_a_campaign_with_a_pool_plans_one_trial_per_pool_and_rows_record_it(tmp_path):
    (tmp_path / "c.yaml").write_text("model: demo:vgg\nbits: random:exponent\nfault: flip, flip:2\n")
    spec = spec_from_yaml(tmp_path / "c.yaml")
    assert (spec.bits, spec.fault) == ("random:exponent", "flip,flip:2")
    plan = resolve(dataclasses.replace(spec, sites=("neuron", "weight"), layers="1", weights="none", images=16, seeds=(5,),
                                       weight_format="fp8_e4m3fn"))
    assert [(t.kind, t.site, t.bit, t.fault) for t in plan.trials] == [
        ("neuron", 1, "random:exponent", "flip"), ("neuron", 1, "random:exponent", "flip:2"),
        ("weight", 1, "random:exponent", "flip"), ("weight", 1, "random:exponent", "flip:2")]
    assert [t.key for t in (TrialPoint(t.kind, t.site, t.bit, t.seed, t.fault) for t in plan.trials)] == [
        "neuron-s0001-brandomexponent-seed5", "neuron-s0001-brandomexponent-seed5-flip2",
        "weight-s0001-brandomexponent-seed5", "weight-s0001-brandomexponent-seed5-flip2"]
    settings = CampaignSettings(name="pool", directory=str(tmp_path / "run"), model="demo:vgg", dataset="fashion-mnist",
                                images=200, report_every=200, record="all", weight_format="fp8_e4m3fn",
                                images_per_weight_fault=10)
    rows = {(t.kind, t.fault): run_trial(settings, TrialPoint(t.kind, t.site, t.bit, t.seed, t.fault)) for t in plan.trials}
    neuron, weight = rows[("neuron", "flip")], rows[("weight", "flip:2")]
    assert (neuron["trial_key"], neuron["bit_spec"], neuron["bit"]) == ("neuron-s0001-brandomexponent-seed5", "random:exponent", -1)
    assert (weight["trial_key"], weight["bit_spec"], weight["bit"]) == ("weight-s0001-brandomexponent-seed5-flip2", "random:exponent", -1)
    R.write_spec(settings.directory, {"name": "pool", "seeds": [5]})
    R.aggregate(settings.directory)
    faults = pd.read_parquet(tmp_path / "run" / "faults")
    hit = {key: {b for t in bit_sets(faults.fault_mask[faults.trial_key == key], width) for b in t}
           for key, width in (("neuron-s0001-brandomexponent-seed5", 32), ("weight-s0001-brandomexponent-seed5-flip2", 8))}
    assert hit["neuron-s0001-brandomexponent-seed5"] == set(range(23, 31))  # fp32 activations: bits 30-23
    assert hit["weight-s0001-brandomexponent-seed5-flip2"] == set(range(3, 7))  # e4m3fn weights: bits 6-3
    bits = pd.read_parquet(tmp_path / "run" / R.BITS_FILE).groupby("trial_key")["bit"].apply(set)
    assert bits["neuron-s0001-brandomexponent-seed5"] == set(range(23, 31))
    site = analysis.per_site(analysis.load(settings.directory))  # pools are their own bit sampling, never 'fixed'
    assert set(site["bit_sampling"].astype(str)) == {"pool"} and set(site["bit_specs"]) == {"random:exponent"}
    fields = analysis.per_bit_field(settings.directory)
    assert sorted({(r.kind, r.field) for r in fields.itertuples()}) == [("neuron", "exponent"), ("weight", "exponent")]


@pytest.mark.parametrize("changes,message", [
    ({"bits": "random:23-40"}, "bits: bit pool random:23-40: bit 32 is outside a 32-bit dtype: allowed 0..31"),
    ({"bits": "random:"}, "bits: bit pool 'random:' is empty"),
    ({"bits": "random:30-23"}, "bits: bit pool 'random:30-23': range 30-23 is reversed: write 23-30"),
    ({"bits": "random:exponant"}, "bits: bit pool 'random:exponant': cannot read 'exponant'"),
    ({"bits": "random:magnitude"}, ("bits: bit pool random:magnitude: fp32 has no magnitude field (its fields: sign 31, "
                                    "exponent 30-23, mantissa 22-0) (neuron sites)")),
    ({"bits": "random:exponent", "dtype": "fp16", "fault": "flip:6"},
     ("fault: fault model flip:6 needs 6 distinct bits but bit pool random:exponent holds 5 in a 16-bit element: "
      "K must be 1..5 (neuron sites)")),
    ({"bits": "random:exponent", "fault": "zero"}, ("fault: zero replaces every bit of an element and takes no bit "
                                                    "position: use bits random, not random:exponent")),
    ({"bits": "random:0-9", "sites": ("neuron", "weight"), "weight_format": "fp8_e5m2"},
     "bits: bit pool random:0-9: bit 8 is outside a 8-bit dtype: allowed 0..7 (LSB = 0) for the fp8_e5m2 weights"),
    ({"bits": "random:exponent", "sites": ("neuron", "weight"), "fault": "flip:5", "weight_format": "fp8_e4m3fn"},
     ("fault: fault model flip:5 needs 5 distinct bits but bit pool random:exponent holds 4 in a 8-bit element: "
      "K must be 1..4 (weight sites)")),
])
def test_bad_pool_specs_fail_in_one_line_before_anything_runs(tmp_path, changes, message):
    spec = CampaignSpec(**{"model": "demo:vgg", "sites": ("neuron",), "layers": "1", "weights": "none", "images": 16,
                           "out": str(tmp_path), **changes})
    with pytest.raises(SpecError) as err:
        resolve(spec)
    assert str(err.value).startswith(message) and len(str(err.value).splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
