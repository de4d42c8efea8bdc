"""The report's tables pooled batch by batch (analysis.stream) equal the tables of the whole frames
(analysis.load + analysis.tables), on a campaign aggregated in several row groups and read a few
rows at a time; and the report itself is the same text and files either way."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis import report, stream
from analysis.load import load, load_bits
from analysis.report import _only_verified
from analysis.tables import per_bit, per_bit_field, per_seed, per_site, per_type, site_by_bit, write_seed_csv
from trainables import results as R

COUNT_NAMES = ("images", "golden_correct", "mismatches", "changed", "nonfinite", "sdc", "failures")


def trial(kind, site, site_type, bit_spec, seed, bits, fault="flip", mode="fp32", classes=True, name=None):
    """A trial row and its per-bit rows; ``bits``: flipped bit -> (images, golden_correct, mismatches,
    changed, nonfinite); the trial's counts are their sums (no class counts: ``classes`` False)."""
    key = R.trial_key(kind, site, bit_spec, seed, fault)
    rows = [dict(campaign="c", trial_key=key, bit=b, images=i, golden_correct=g, mismatches=m, changed=ch,
                 nonfinite=nf, sdc=ch - nf if classes else None, failures=m if classes else None)
            for b, (i, g, m, ch, nf) in bits.items()]
    total = {c: sum(r[c] for r in rows) if classes or c not in ("sdc", "failures") else None for c in COUNT_NAMES}
    row = dict(campaign="c", trial_key=key, model="demo:vgg", dataset="fashion-mnist", synthetic=False, mode=mode,
               kind=kind, site_index=site, site_name=name or f"features.{site}", site_call=0, site_type=site_type,
               bit_spec=str(bit_spec), bit=-1 if not str(bit_spec).isdigit() else int(bit_spec), seed=seed,
               images_per_weight_fault=1, batch_size=64, **total, misclassification_rate=math.nan, ci_low=0.0,
               ci_high=1.0, stopped_early=False, wall_s=0.1, device="cpu", fault=None if fault == "flip" else fault)
    row.update({name: None for name in R.TRIAL_SCHEMA.names if name not in row})
    return row, [{**{name: None for name in R.BIT_SCHEMA.names}, **r} for r in rows]


def campaign_trials():
    """Neuron, weight and qparam sites, random-bit trials whose faults fall in several bits of one field,
    fixed bits, a second fault model, whole-element faults (no bit position), rows without class counts."""
    out = []
    for seed in (1, 2, 3):
        for site, site_type in ((0, "Identity"), (1, "Conv2d"), (2, "ReLU")):
            s = seed + site
            out.append(trial("neuron", site, site_type, "random", seed, {
                30: (20 + s, 18, s % 4, s % 5, s % 2), 23: (10, 9, 1, 1, 0), 25: (12, 11, 0, 1, 0),
                3: (15, 14, 0, 0, 0), 31: (8, 7, seed % 3, seed % 3, 0)}))
            out.append(trial("neuron", site, site_type, 30, seed, {30: (40, 36, s, s + 1, 1)}))
            out.append(trial("neuron", site, site_type, 2, seed, {2: (40, 36, 0, 0, 0)}, classes=seed != 2))
            out.append(trial("neuron", site, site_type, "random", seed, {26: (30, 27, 2, 3, 1), 5: (30, 27, 0, 0, 0)},
                             fault="burst:2"))
            out.append(trial("neuron", site, site_type, "random", seed, {0: (30, 28, 4, 5, 2)}, fault="zero"))
        out.append(trial("weight", 1, "Conv2d", "random", seed, {30: (64, 60, 5, 6, 2), 29: (64, 60, 1, 1, 0),
                                                                 10: (64, 60, 0, 0, 0)}))
        out.append(trial("weight", 1, "Conv2d", 30, seed, {30: (0, 0, 0, 0, 0)}))  # a per-bit row of no faults
        # an int8 model's scales (fp32 words) and zero points (int32 words): per-bit tables keep them apart
        out.append(trial("qparam", 4, "Conv2d", "random", seed, {31: (16, 15, 1, 1, 0), 3: (16, 15, 0, 0, 0)}, mode="int8",
                         name="features.4.zero_point"))
        out.append(trial("qparam", 5, "Conv2d", "random", seed, {30: (16, 15, 2, 2, 1), 23: (16, 15, 1, 1, 0)},
                         mode="int8", name="features.5.scale"))
    return out


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stream") / "c"
    R.write_spec(directory, {"name": "c", "seeds": [1, 2, 3]})
    for row, bits in campaign_trials():
        R.write_trial(directory, row, bits, None)
    saved = R.AGGREGATE_ROW_GROUP
    R.AGGREGATE_ROW_GROUP = 7  # several row groups in trials.parquet and bits.parquet
    try:
        R.aggregate(directory)
    finally:
        R.AGGREGATE_ROW_GROUP = saved
    return directory


def in_memory(directory, keep):
    """The tables as report computed them before: from the whole frames."""
    trials, bits = _only_verified(load([directory]), keep), _only_verified(load_bits([directory]), keep)
    return {"per_site": per_site(trials), "per_type": per_type(trials), "per_seed": per_seed(trials),
            "per_bit": per_bit(bits), "per_bit_field": per_bit_field(bits), "site_by_bit": site_by_bit(bits)}, trials


def streamed(directory, keep, batch_rows):
    pooled = stream.pooled([directory], keep, batch_rows)
    return {"per_site": per_site(pooled.sites), "per_type": per_type(pooled.sites), "per_seed": per_seed(pooled.seeds),
            "per_bit": per_bit(pooled.bits), "per_bit_field": per_bit_field(pooled.fields),
            "site_by_bit": site_by_bit(pooled.bits)}, pooled.layout


@pytest.mark.parametrize("batch_rows, partial", [(4, False), (13, True)])  # one whole batch: the report test
def test_tables_pooled_batch_by_batch_equal_the_tables_of_the_whole_frames(directory, tmp_path, batch_rows, partial):
    import pyarrow.parquet as pq

    assert pq.ParquetFile(directory / "trials.parquet").num_row_groups > 1
    assert pq.ParquetFile(directory / "bits.parquet").num_row_groups > 1
    keys = sorted(load([directory])["trial_key"].astype(str))
    keep = {str(directory): set(keys[::3])} if partial else {}  # a PARTIAL campaign: its verified trials only
    expected, whole = in_memory(directory, keep)
    got, pooled = streamed(directory, keep, batch_rows)
    for name, table in expected.items():
        assert len(table) and (table["trials"] > 0).all(), name
        pd.testing.assert_frame_equal(got[name], table, check_exact=True, obj=name)
    # a trial with several bits of one field counts once there: fewer trials than per bit (a sum would not be)
    assert got["per_bit_field"]["trials"].sum() < got["per_bit"]["trials"].sum()
    written = [write_seed_csv(frame, tmp_path / name / "seed_layout.csv") for name, frame in
               (("whole", whole), ("pooled", pooled))]
    assert [p.name for p in written[0]] == [p.name for p in written[1]] and len(written[0]) >= 4  # per kind, fault model, bit sampling
    for a, b in zip(*written):
        assert a.read_bytes() == b.read_bytes()


def test_the_report_is_the_same_text_and_files_pooled_or_whole(directory, tmp_path, monkeypatch):
    pooled_text = report.run([str(directory)], str(tmp_path / "pooled"))
    assert "Files written to" in pooled_text
    calls = []
    monkeypatch.setattr(stream, "pooled", lambda *a, **k: calls.append(a) or None)  # the whole frames, as before
    whole_text = report.run([str(directory)], str(tmp_path / "whole"))
    assert calls and pooled_text.replace(str(tmp_path / "pooled"), str(tmp_path / "whole")) == whole_text
    assert "27 trials" not in pooled_text and f"{len(campaign_trials())} trials" in pooled_text
    names = sorted(p.name for p in (tmp_path / "whole").iterdir() if p.suffix == ".csv")
    assert names == sorted(p.name for p in (tmp_path / "pooled").iterdir() if p.suffix == ".csv") and len(names) >= 8
    for name in names:
        assert (tmp_path / "pooled" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_campaigns_the_bounded_path_does_not_cover_read_the_whole_frames(directory, tmp_path):
    assert stream.pooled([directory, directory], {}) is None  # several campaigns: compared on whole frames
    other = tmp_path / "lm"
    R.write_spec(other, {"name": "lm"})
    row, bits = trial("neuron", 1, "Linear", 30, 1, {30: (4, 0, 0, 1, 0)})
    row["trial_kind"] = "teacher-forced"
    R.write_trial(other, row, bits, None)
    R.aggregate(other)
    assert stream.pooled([other], {}) is None  # a causal LM's teacher-forced trials: their own tables
