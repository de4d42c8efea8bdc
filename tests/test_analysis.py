"""Tests of the analysis package on campaigns written through the campaign's own writer
(trainables.results.write_spec / write_trial / aggregate)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import analysis
from analysis import report
from analysis.plots import plot_bit_rates, plot_site_bit_heatmap, plot_site_rates
from trainables import results as R

ROOT = Path(__file__).resolve().parents[1]
Z = 1.959963984540054


# ---------------------------------------------------------------- fixtures through the writer

def _trial(campaign, kind, site, site_type, bit_spec, seed, bits, model="resnet20", dataset="cifar10", mode="fp32"):
    """One trial row and its per-bit rows. ``bits`` maps the flipped bit to (images,
    golden_correct, mismatches[, changed[, nonfinite]]); the trial's counts are their sums. The
    outcome classes follow: sdc = changed - nonfinite (every non-finite fault changed top-1),
    failures = mismatches (no golden-correct image with unchanged non-finite logits)."""
    key = R.trial_key(kind, site, bit_spec, seed)
    bit_rows = []
    for bit, counts in bits.items():
        images, golden, mism, *rest = counts
        changed = rest[0] if rest else mism
        nonfinite = rest[1] if len(rest) > 1 else 0
        bit_rows.append(dict(campaign=campaign, trial_key=key, bit=bit, images=images, golden_correct=golden,
                             mismatches=mism, changed=changed, nonfinite=nonfinite, sdc=max(changed - nonfinite, 0),
                             failures=mism))
    tot = {c: sum(r[c] for r in bit_rows)
           for c in ("images", "golden_correct", "mismatches", "changed", "nonfinite", "sdc", "failures")}
    row = dict(
        campaign=campaign, trial_key=key, model=model, dataset=dataset, synthetic=False, mode=mode, kind=kind,
        site_index=site, site_name=f"features.{site}", site_call=0, site_type=site_type, bit_spec=str(bit_spec),
        bit=-1 if bit_spec == "random" else int(bit_spec), seed=seed, images_per_weight_fault=1, batch_size=256,
        **tot, misclassification_rate=tot["mismatches"] / tot["golden_correct"] if tot["golden_correct"] else math.nan,
        sdc_rate=tot["changed"] / tot["images"], nonfinite_rate=tot["nonfinite"] / tot["images"],
        ci_low=0.0, ci_high=1.0, stopped_early=False, wall_s=0.5, device="cpu",
    )
    row.update({name: None for name in R.TRIAL_SCHEMA.names if name not in row})  # columns added later
    bit_rows = [{**{name: None for name in R.BIT_SCHEMA.names}, **r} for r in bit_rows]
    return row, bit_rows


def make_campaign(directory: Path, name: str, trials: list, faults: dict | None = None, **spec) -> Path:
    """Write spec.json, each trial (row, bit rows) and aggregate, as the campaign does."""
    R.write_spec(directory, {"name": name, **spec})
    for row, bit_rows in trials:
        R.write_trial(directory, row, bit_rows, (faults or {}).get(row["trial_key"]))
    R.aggregate(directory)
    return directory


def random_trial(campaign, site, site_type, seed, bits, **kw):
    return _trial(campaign, kw.pop("kind", "neuron"), site, site_type, "random", seed, bits, **kw)


def fixed_trial(campaign, site, site_type, bit, seed, counts, **kw):
    return _trial(campaign, kw.pop("kind", "neuron"), site, site_type, bit, seed, {bit: counts}, **kw)


@pytest.fixture
def basic(tmp_path) -> Path:
    """Two sites x two seeds of random-bit neuron faults: site 1 is 3/90 (seed 1) and 5/80 (seed 2)."""
    c = "basic"
    return make_campaign(tmp_path / "basic", c, [
        random_trial(c, 0, "Identity", 1, {30: (50, 45, 2, 3, 1), 3: (50, 45, 0, 0, 0)}),
        random_trial(c, 0, "Identity", 2, {30: (40, 36, 1, 1, 0), 12: (60, 54, 0, 0, 0)}),
        random_trial(c, 1, "Conv2d", 1, {30: (60, 54, 3, 4, 2), 22: (40, 36, 0, 1, 0)}),
        random_trial(c, 1, "Conv2d", 2, {30: (50, 40, 4, 4, 1), 31: (50, 40, 1, 1, 0)}),
    ], model="resnet20", seeds=[1, 2])


def wilson_by_hand(k: float, n: float) -> tuple[float, float]:
    """The Wilson score interval written out independently of trainables.stats."""
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------- loading

def test_load_dtypes_and_campaign_column(basic, tmp_path):
    other = make_campaign(tmp_path / "other", "other", [
        fixed_trial("other", 1, "Conv2d", 30, 7, (10, 9, 4), kind="weight", mode="bf16"),
    ])
    df = analysis.load([basic, other])
    assert len(df) == 5
    for column in ("kind", "site_type", "mode", "model", "dataset", "bit_spec", "campaign"):
        assert isinstance(df[column].dtype, pd.CategoricalDtype), column
    for column in ("images", "golden_correct", "mismatches", "changed", "nonfinite", "site_index", "bit", "seed"):
        assert df[column].dtype == np.int64, column
    assert list(df["campaign"].cat.categories) == ["basic", "other"]  # in the order given
    assert df["campaign_dir"].iloc[0] == str(basic)
    assert list(df["bit_spec"].cat.categories) == ["random", "30"]
    # one campaign alone has the same dtypes: frames concatenate cleanly
    single = analysis.load(basic)
    assert (single.dtypes.astype(str) == df.dtypes.astype(str)).all()


def test_same_campaign_name_in_two_dirs_is_disambiguated(basic, tmp_path):
    twin = make_campaign(tmp_path / "twin", "basic", [fixed_trial("basic", 1, "Conv2d", 30, 9, (10, 10, 1))])
    df = analysis.load([basic, twin, basic])  # the repeated directory is read once
    assert sorted(df["campaign"].unique()) == ["basic", "basic [2]"]
    assert len(df) == 5


def test_load_bits_joins_trial_columns(basic):
    bits = analysis.load_bits(basic)
    assert len(bits) == 8
    for column in ("campaign", "model", "dataset", "mode", "kind", "site_index", "site_name", "site_type", "seed", "bit_spec"):
        assert column in bits.columns
    row = bits[(bits.site_index == 1) & (bits.seed == 2) & (bits.bit == 31)].iloc[0]
    assert (row.images, row.golden_correct, row.mismatches, row.site_type, row.bit_spec) == (50, 40, 1, "Conv2d", "random")


def test_load_faults_empty_and_joined(basic, tmp_path):
    empty = analysis.load_faults(basic)
    assert empty.empty and {"trial_key", "image", "bit", "site_type", "model"} <= set(empty.columns)
    row, bit_rows = fixed_trial("f", 2, "ReLU", 30, 5, (3, 2, 1))
    faults = {c: [] for c in R.FAULT_SCHEMA.names}
    for i in range(3):
        values = dict(campaign="f", trial_key=row["trial_key"], kind="neuron", site_index=2, site_name="conv", seed=5,
                      image=i, label=1, golden=1 if i else 0, faulty=3 if i == 2 else (1 if i else 0), golden_correct=bool(i),
                      changed=i == 2, nonfinite=False, position=10 + i, fault_group=-1, bit=30, raw_before=0,
                      value_before=1.0, value_after=2.0 ** 128, outcome="sdc" if i == 2 else "masked")
        for c, v in values.items():
            faults[c].append(v)
    faults.update({c: [None] * 3 for c, v in faults.items() if not v})  # columns added later
    directory = make_campaign(tmp_path / "f", "f", [(row, bit_rows)], faults={row["trial_key"]: faults})
    df = analysis.load_faults(directory)
    assert list(df["image"]) == [0, 1, 2]
    assert df["site_type"].iloc[0] == "ReLU" and df["mode"].iloc[0] == "fp32"
    assert list(df["changed"]) == [False, False, True]
    assert list(empty.columns) == list(df.columns)


# ---------------------------------------------------------------- pooled tables

def test_per_site_pools_by_summing_counts(basic):
    site = analysis.per_site(analysis.load(basic))
    conv = site[site.site_index == 1].iloc[0]
    assert (conv.mismatches, conv.golden_correct, conv.trials) == (8, 170, 2)  # 3/90 + 5/80
    assert conv.misclassification_rate == pytest.approx(8 / 170)
    assert conv.misclassification_rate != pytest.approx((3 / 90 + 5 / 80) / 2)
    low, high = wilson_by_hand(8, 170)
    assert (conv.ci_low, conv.ci_high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert conv.sdc_rate == pytest.approx(7 / 200) and conv.nonfinite_rate == pytest.approx(3 / 200)  # sdc: 2+1+3+1
    assert conv.masked == 190 and conv.masked_rate == pytest.approx(190 / 200) and conv.failure_rate == pytest.approx(8 / 170)
    assert (conv.site_name, conv.site_type, conv.bit_specs) == ("features.1", "Conv2d", "random")
    assert list(site.columns[:8]) == ["model", "dataset", "mode", "kind", "bit_sampling", "site_index", "site_name", "site_type"]


def test_per_type_and_per_seed(basic):
    df = analysis.load(basic)
    types = analysis.per_type(df).set_index("site_type")
    assert (types.loc["Identity", "mismatches"], types.loc["Identity", "golden_correct"]) == (3, 180)
    seeds = analysis.per_seed(df).set_index("seed")
    assert (seeds.loc[1, "mismatches"], seeds.loc[1, "golden_correct"]) == (5, 180)
    assert (seeds.loc[2, "mismatches"], seeds.loc[2, "golden_correct"]) == (6, 170)


def test_wilson_bounds_known_values(tmp_path):
    c = "w"
    directory = make_campaign(tmp_path / "w", c, [
        fixed_trial(c, 0, "Identity", 30, 1, (10, 10, 0)),
        fixed_trial(c, 1, "Conv2d", 30, 1, (10, 10, 5)),
        fixed_trial(c, 2, "ReLU", 30, 1, (10, 10, 10)),
        fixed_trial(c, 3, "Linear", 30, 1, (10000, 9224, 3)),
    ])
    site = analysis.per_site(directory).set_index("site_index")
    published = {0: (0.0, 0.27753), 1: (0.23659, 0.76341), 2: (0.72247, 1.0)}
    for k, (low, high) in published.items():
        assert site.loc[k, "ci_low"] == pytest.approx(low, abs=5e-6)
        assert site.loc[k, "ci_high"] == pytest.approx(high, abs=5e-6)
    low, high = wilson_by_hand(3, 9224)
    assert site.loc[3, "ci_low"] == pytest.approx(low, rel=1e-9) and 0.000110 < low < 0.000111
    assert site.loc[3, "ci_high"] == pytest.approx(high, rel=1e-9) and 0.0009558 < high < 0.0009559


def test_per_bit_splits_random_trials_via_bit_rows(basic, tmp_path):
    bits = analysis.per_bit(analysis.load_bits(basic)).set_index("bit")
    assert list(bits.index) == [3, 12, 22, 30, 31]
    assert (bits.loc[30, "mismatches"], bits.loc[30, "golden_correct"], bits.loc[30, "trials"]) == (10, 175, 4)
    assert bits.loc[30, "field"] == "exponent" and bits.loc[31, "field"] == "sign"
    assert bits.loc[30, "misclassification_rate"] == pytest.approx(10 / 175)
    with pytest.raises(ValueError, match="random-bit"):
        analysis.per_bit(analysis.load(basic))  # trial rows cannot be split per bit
    assert analysis.per_bit(basic).equals(analysis.per_bit(analysis.load_bits(basic)))  # a directory loads bits


def mixed_campaign(tmp_path, *extra_fixed):
    """One random-bit trial and one bit-30 trial of site 4, plus ``extra_fixed`` (bit, seed, counts)."""
    c = "mix"
    return make_campaign(tmp_path / "mix", c, [
        random_trial(c, 4, "Conv2d", 1, {30: (20, 18, 9), 2: (30, 27, 0)}),
        fixed_trial(c, 4, "Conv2d", 30, 1, (100, 90, 50)),
        *(fixed_trial(c, 4, "Conv2d", bit, seed, counts) for bit, seed, counts in extra_fixed),
    ])


def test_random_and_fixed_bit_trials_pool_per_bit(tmp_path):
    directory = mixed_campaign(tmp_path)
    table = analysis.site_by_bit(directory).set_index("bit")
    assert (table.loc[30, "mismatches"], table.loc[30, "golden_correct"]) == (59, 108)
    assert (table.loc[2, "mismatches"], table.loc[2, "golden_correct"]) == (0, 27)


def test_random_bit_trials_kept_apart_from_fixed_bit_trials(tmp_path):
    directory = mixed_campaign(tmp_path, (2, 1, (100, 90, 1)), (2, 2, (100, 90, 2)))
    site = analysis.per_site(directory)
    got = [(r.bit_sampling, r.bit_specs, r.trials, r.mismatches, r.golden_correct) for r in site.itertuples()]
    assert got == [("random", "random", 1, 9, 45), ("fixed", "2,30", 3, 53, 270)]  # fixed bits pool together
    assert analysis.seed_layer_lines(site) == [
        "resnet20 / cifar10 / fp32 / neuron faults (bit: random)", "Layer #4: 9 / 45 = 20.0000%, Conv2d", "",
        "resnet20 / cifar10 / fp32 / neuron faults (bit: 2,30)", "Layer #4: 53 / 270 = 19.6296%, Conv2d",
    ]
    paths = analysis.write_seed_csv(directory, tmp_path / "seed.csv")
    assert [p.name for p in paths] == ["seed_random.csv", "seed_fixed.csv"]
    assert paths[1].read_text().splitlines()[1] == f"Layer #4 Conv2d,4,features.4,Conv2d,{51 / 180!r},{2 / 90!r}"


def test_per_bit_field_widths_follow_the_mode(tmp_path):
    def camp(name, mode, bits):
        return make_campaign(tmp_path / name, name, [
            random_trial(name, 1, "Conv2d", 1, {b: (10, 10, m) for b, m in bits.items()}, mode=mode)])
    fp32 = camp("a32", "fp32", {31: 1, 30: 9, 23: 2, 22: 1, 0: 0})
    bf16 = camp("b16", "bf16", {15: 1, 14: 8, 7: 3, 6: 2})
    fp16 = camp("h16", "fp16", {15: 0, 14: 7, 10: 1, 9: 4})
    table = analysis.per_bit_field(analysis.load_bits([fp32, bf16, fp16]))
    got = {(r.mode, r.field): (r.bit_range, r.width, r.mismatches, r.golden_correct) for r in table.itertuples()}
    assert got == {
        ("fp32", "sign"): ("31", 1, 1, 10), ("fp32", "exponent"): ("30-23", 8, 11, 20), ("fp32", "mantissa"): ("22-0", 23, 1, 20),
        ("bf16", "sign"): ("15", 1, 1, 10), ("bf16", "exponent"): ("14-7", 8, 11, 20), ("bf16", "mantissa"): ("6-0", 7, 2, 10),
        ("fp16", "sign"): ("15", 1, 0, 10), ("fp16", "exponent"): ("14-10", 5, 8, 20), ("fp16", "mantissa"): ("9-0", 10, 4, 10),
    }
    assert analysis.bit_field("tf32", 23) == "exponent" and analysis.bit_field("fp16", 10) == "exponent"
    assert analysis.bit_field("fp16", 9) == "mantissa"
    with pytest.raises(ValueError, match="unknown math mode"):
        analysis.bit_field("int4", 3)


def test_bit_fields_of_int8_and_fp8_formats(tmp_path):
    """int8 weights: sign 7, magnitude 6-0; quint8 activations: magnitude 7-0 (no sign); fp8 weight
    storage: e4m3fn sign 7, exponent 6-3, mantissa 2-0 and e5m2 exponent 6-2, mantissa 1-0, while
    the same campaign's neuron rows keep fp32's layout and fp8 rows never pool with fp32 ones."""
    def camp(name, kind, mode, bits, weight_format=None):
        row, bit_rows = random_trial(name, 1, "Conv2d", 1, {b: (10, 10, m) for b, m in bits.items()}, mode=mode, kind=kind)
        row["weight_format"] = weight_format
        return make_campaign(tmp_path / name, name, [(row, bit_rows)])
    int8_w = camp("i8w", "weight", "int8", {7: 6, 6: 3, 0: 1})
    int8_n = camp("i8n", "neuron", "int8", {7: 5, 3: 1})
    e4m3 = camp("e4", "weight", "fp32", {7: 4, 6: 9, 3: 2, 2: 1}, "fp8_e4m3fn")
    e5m2 = camp("e5", "weight", "fp32", {6: 8, 2: 3, 1: 2}, "fp8_e5m2")
    fp32_n = camp("f32n", "neuron", "fp32", {30: 7}, "fp8_e5m2")
    fp32_w = camp("f32w", "weight", "fp32", {30: 5})
    table = analysis.per_bit_field(analysis.load_bits([int8_w, int8_n, e4m3, e5m2, fp32_n, fp32_w]))
    got = {(r.mode, r.kind, r.weight_format, r.field): (r.bit_range, r.width, r.mismatches) for r in table.itertuples()}
    assert got == {
        ("int8", "weight", "none", "sign"): ("7", 1, 6), ("int8", "weight", "none", "magnitude"): ("6-0", 7, 4),
        ("int8", "neuron", "none", "magnitude"): ("7-0", 8, 6),
        ("fp32", "weight", "fp8_e4m3fn", "sign"): ("7", 1, 4), ("fp32", "weight", "fp8_e4m3fn", "exponent"): ("6-3", 4, 11),
        ("fp32", "weight", "fp8_e4m3fn", "mantissa"): ("2-0", 3, 1),
        ("fp32", "weight", "fp8_e5m2", "exponent"): ("6-2", 5, 11), ("fp32", "weight", "fp8_e5m2", "mantissa"): ("1-0", 2, 2),
        ("fp32", "neuron", "fp8_e5m2", "exponent"): ("30-23", 8, 7),
        ("fp32", "weight", "none", "exponent"): ("30-23", 8, 5),
    }
    assert [analysis.bit_field("fp8_e4m3fn", b) for b in (7, 3, 2)] == ["sign", "exponent", "mantissa"]
    assert [analysis.bit_field("fp8_e5m2", b) for b in (7, 2, 1)] == ["sign", "exponent", "mantissa"]
    assert [analysis.bit_field("int8", b) for b in (7, 6)] == ["sign", "magnitude"]
    assert analysis.bit_field("uint8", 7) == "magnitude"


def test_mixed_models_and_kinds_are_grouped_never_merged(tmp_path):
    a = make_campaign(tmp_path / "a", "a", [
        fixed_trial("a", 1, "Conv2d", 30, 1, (10, 10, 1)),
        fixed_trial("a", 1, "Conv2d", 30, 1, (10, 10, 2), kind="weight"),
    ])
    b = make_campaign(tmp_path / "b", "b", [fixed_trial("b", 1, "Conv2d", 30, 1, (10, 10, 3), model="vgg11_bn")])
    for table in (analysis.per_site([a, b]), analysis.per_type([a, b]), analysis.per_bit([a, b]), analysis.per_seed([a, b])):
        got = sorted(zip(table["model"].astype(str), table["kind"].astype(str), table["mismatches"]))
        assert got == [("resnet20", "neuron", 1), ("resnet20", "weight", 2), ("vgg11_bn", "neuron", 3)]


def test_same_identity_pools_unless_by_campaign(tmp_path):
    a = make_campaign(tmp_path / "a", "a", [fixed_trial("a", 1, "Conv2d", 30, 1, (90, 90, 3))])
    b = make_campaign(tmp_path / "b", "b", [fixed_trial("b", 1, "Conv2d", 30, 2, (80, 80, 5))])
    pooled = analysis.per_site([a, b])
    assert len(pooled) == 1 and (pooled.mismatches.iloc[0], pooled.golden_correct.iloc[0]) == (8, 170)
    apart = analysis.per_site([a, b], by_campaign=True)
    assert list(apart["campaign"]) == ["a", "b"] and list(apart["mismatches"]) == [3, 5]


# ---------------------------------------------------------------- seed form

def test_seed_layer_lines_exact(basic):
    lines = analysis.seed_layer_lines(analysis.per_site(basic))
    assert lines == [
        "resnet20 / cifar10 / fp32 / neuron faults (bit: random)",
        "Layer #0: 3 / 180 = 1.6667%, Identity",
        "Layer #1: 8 / 170 = 4.7059%, Conv2d",
    ]


def test_seed_layer_lines_one_header_per_identity(tmp_path):
    a = make_campaign(tmp_path / "a", "a", [
        fixed_trial("a", 1, "Conv2d", 30, 1, (10, 10, 1)),
        fixed_trial("a", 0, "Conv2d", 30, 1, (10, 8, 2), kind="weight"),
    ])
    lines = analysis.seed_layer_lines(analysis.per_site(a, by_campaign=True))
    assert lines == [
        "[a] resnet20 / cifar10 / fp32 / neuron faults (bit: 30)", "Layer #1: 1 / 10 = 10.0000%, Conv2d", "",
        "[a] resnet20 / cifar10 / fp32 / weight faults (bit: 30)", "Layer #0: 2 / 8 = 25.0000%, Conv2d",
    ]


def test_write_seed_csv_exact(basic, tmp_path):
    paths = analysis.write_seed_csv(analysis.load(basic), tmp_path / "out" / "seed_layout.csv")
    assert paths == [tmp_path / "out" / "seed_layout.csv"]
    assert paths[0].read_text() == (
        "name,site_index,site_name,site_type,seed_1,seed_2\n"
        "Layer #0 Identity,0,features.0,Identity,0.022222222222222223,0.011111111111111112\n"
        "Layer #1 Conv2d,1,features.1,Conv2d,0.03333333333333333,0.0625\n"
    )


def test_write_seed_csv_one_file_per_kind(tmp_path):
    c = "k"
    directory = make_campaign(tmp_path / "k", c, [
        fixed_trial(c, 0, "Identity", 30, 3, (10, 10, 1)),
        fixed_trial(c, 0, "Conv2d", 30, 3, (10, 10, 2), kind="weight"),
        fixed_trial(c, 0, "Conv2d", 30, 4, (10, 5, 1), kind="weight"),
    ])
    paths = analysis.write_seed_csv(directory, tmp_path / "seed_layout.csv")
    assert [p.name for p in paths] == ["seed_layout_neuron.csv", "seed_layout_weight.csv"]
    assert paths[0].read_text() == "name,site_index,site_name,site_type,seed_3\nLayer #0 Identity,0,features.0,Identity,0.1\n"
    assert paths[1].read_text() == "name,site_index,site_name,site_type,seed_3,seed_4\nLayer #0 Conv2d,0,features.0,Conv2d,0.2,0.2\n"


# ---------------------------------------------------------------- comparison

@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    a = make_campaign(tmp_path / "fp", "fp", [
        random_trial("fp", 0, "Identity", 1, {30: (100, 100, 8), 1: (100, 90, 0)}),
        random_trial("fp", 1, "Conv2d", 1, {30: (100, 100, 5)}),
    ], mode="fp32")
    b = make_campaign(tmp_path / "bf", "bf", [
        random_trial("bf", 0, "Identity", 1, {14: (100, 100, 40), 1: (100, 90, 0)}, mode="bf16"),
        random_trial("bf", 1, "Conv2d", 1, {14: (100, 100, 6)}, mode="bf16"),
    ], mode="bf16")
    return a, b


def test_compare_by_site_difference_and_overlap(pair):
    table = analysis.compare(list(pair), by="site")
    assert list(table.attrs["sides"]) == ["fp", "bf"]
    assert table.attrs["sides"]["bf"]["mode"] == "bf16"
    first, second = table.iloc[0], table.iloc[1]
    assert first["rate[fp]"] == pytest.approx(8 / 190) and first["rate[bf]"] == pytest.approx(40 / 190)
    assert first["diff[bf]"] == pytest.approx(32 / 190)
    assert first["overlap[bf]"] == False  # noqa: E712  (4.2% [2.2, 8.1] vs 21% [16, 27])
    assert second["diff[bf]"] == pytest.approx(0.01) and second["overlap[bf]"] == True  # noqa: E712
    assert (first["mismatches[bf]"], first["golden_correct[bf]"]) == (40, 190)
    assert "diff[fp]" not in table.columns  # the baseline has no difference to itself


def test_compare_by_type_field_and_bit(pair):
    by_type = analysis.compare(list(pair), by="type").set_index("site_type")
    assert by_type.loc["Conv2d", "diff[bf]"] == pytest.approx(0.01)
    by_field = analysis.compare(list(pair), by="field").set_index("field")
    assert by_field.loc["exponent", "rate[fp]"] == pytest.approx(13 / 200)
    assert by_field.loc["exponent", "rate[bf]"] == pytest.approx(46 / 200)
    by_bit = analysis.compare(list(pair), by="bit").set_index("bit")
    assert pd.isna(by_bit.loc[14, "rate[fp]"]) and pd.isna(by_bit.loc[14, "overlap[bf]"])
    assert by_bit.loc[1, "diff[bf]"] == 0 and by_bit.loc[1, "overlap[bf]"] == True  # noqa: E712


def test_compare_kinds_within_one_campaign_and_errors(tmp_path, basic):
    c = "nw"
    directory = make_campaign(tmp_path / "nw", c, [
        fixed_trial(c, 1, "Conv2d", 30, 1, (10, 10, 1)),
        fixed_trial(c, 1, "Conv2d", 30, 1, (10, 10, 6), kind="weight"),
    ])
    table = analysis.compare(directory, by="type")
    assert list(table.attrs["sides"]) == ["nw/neuron", "nw/weight"]
    assert table["diff[nw/weight]"].iloc[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="two or more"):
        analysis.compare(basic)
    with pytest.raises(ValueError, match="by must be"):
        analysis.compare([basic, directory], by="layer")


# ---------------------------------------------------------------- plots and report

def _is_png(path: Path, min_bytes: int = 10_000) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > min_bytes


def test_plots_written(basic, tmp_path):
    trials, bits = analysis.load(basic), analysis.load_bits(basic)
    paths = [
        plot_site_rates(analysis.per_site(trials), tmp_path / "site.png"),
        plot_site_bit_heatmap(analysis.site_by_bit(bits), tmp_path / "heat.png"),
        plot_bit_rates(analysis.per_bit(bits), tmp_path / "bits.png"),  # has zero rates on a log axis
    ]
    assert all(_is_png(p) for p in paths)
    with pytest.raises(ValueError, match="empty"):
        plot_site_rates(analysis.per_site(trials).iloc[:0], tmp_path / "none.png")


def test_report_one_campaign(basic, tmp_path):
    text = report.run([str(basic)])
    out = basic / "report"
    assert "Layer #1: 8 / 170 = 4.7059%, Conv2d" in text
    assert "Per bit position" in text and "Per layer type" in text and "Comparison" not in text
    for name in ("per_site.csv", "per_bit.csv", "per_type.csv", "per_bit_field.csv", "seed_layout.csv"):
        assert (out / name).is_file(), name
    for name in ("per_site.png", "site_by_bit.png", "per_bit.png"):
        assert _is_png(out / name), name
    per_site = pd.read_csv(out / "per_site.csv")
    assert list(per_site["mismatches"]) == [3, 8]


def test_report_two_campaigns_compares(pair, tmp_path):
    text = report.run([str(p) for p in pair], str(tmp_path / "rep"))
    assert "Comparison by site" in text and "Comparison by field" in text and "fp (baseline)" in text
    assert "a bit number means different things" in text
    for name in ("compare_site.csv", "compare_bit.csv", "compare_type.csv", "seed_layout_fp32.csv", "seed_layout_bf16.csv"):
        assert (tmp_path / "rep" / name).is_file(), name
    assert not (pair[0] / "report").exists()


# ---------------------------------------------------------------- bad input

def test_not_a_campaign(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        analysis.load(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a campaign directory: no spec.json"):
        analysis.load(tmp_path / "plain")


def test_parts_without_trials_parquet_says_resume(tmp_path):
    directory = tmp_path / "partial"
    R.write_spec(directory, {"name": "partial"})
    row, bit_rows = fixed_trial("partial", 1, "Conv2d", 30, 1, (10, 10, 1))
    R.write_trial(directory, row, bit_rows, None)
    with pytest.raises(ValueError, match=r"1 finished trial part\(s\).*python -m campaign resume"):
        analysis.load(directory)


def test_newer_schema_version_refused(basic):
    table = pq.read_table(basic / R.TRIALS_FILE)
    pq.write_table(table.replace_schema_metadata({R.VERSION_KEY: b"99"}), basic / R.TRIALS_FILE)
    with pytest.raises(ValueError, match="schema version 99, newer than the supported 1"):
        analysis.load(basic)


def test_newer_spec_version_refused(basic):
    spec = (basic / R.SPEC_FILE).read_text().replace('"schema_version": 1', '"schema_version": 99')
    (basic / R.SPEC_FILE).write_text(spec)
    with pytest.raises(ValueError, match="newer than the supported"):
        analysis.load(basic)


def test_empty_campaign_refused(tmp_path):
    directory = make_campaign(tmp_path / "empty", "empty", [])
    with pytest.raises(ValueError, match="no trials"):
        analysis.load(directory)


def test_missing_columns_refused(basic):
    table = pq.read_table(basic / R.TRIALS_FILE).drop_columns(["mismatches", "site_type"])
    pq.write_table(table.replace_schema_metadata({R.VERSION_KEY: b"1"}), basic / R.TRIALS_FILE)
    with pytest.raises(ValueError, match=r"lacks required column\(s\) \['site_type', 'mismatches'\]"):
        analysis.load(basic)
    with pytest.raises(ValueError, match="lacks column"):
        analysis.per_site(pd.DataFrame({"model": ["m"]}))


# ---------------------------------------------------------------- no torch, no ray

def test_analysis_imports_neither_torch_nor_ray(basic, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "ray"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import analysis, analysis.report, analysis.plots, analysis.compare
        analysis.report.run([{str(basic)!r}], {str(tmp_path / 'r')!r})
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "ray")]
        assert not bad, bad
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
