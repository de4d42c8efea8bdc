"""Statistical fault injection on campaign results: per-stratum counts with anytime-valid and
Wilson intervals, the population-weighted whole-model rate, and the report section comparing
what a campaign spent with the uniform p = 0.5 plan (trainables.sfi holds the formulas).

    import analysis.sfi as S
    strata = S.strata("runs/demo", confidence=0.99)
    est = S.whole_model("runs/demo")        # one random bit of one random element of the selected sites
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from analysis.load import Source, campaign_dirs, load
from trainables import sfi, storage
from trainables.results import read_spec
from trainables.stats import wilson_interval

STRATUM = ["kind", "site_index", "site_type", "bit_spec", "fault"]


def strata(source: Source | pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """One row per stratum (kind, site, bit spec, fault) pooled over seeds: trials, mismatches,
    golden_correct, rate, the confidence sequence (cs_low, cs_high, its half-width) and Wilson's."""
    trials = source if isinstance(source, pd.DataFrame) else load(source)
    keys = [k for k in STRATUM if k in trials]
    pooled = (trials.assign(trials=1).groupby(keys, observed=True, sort=True)
              [["trials", "mismatches", "golden_correct", "images"]].sum().reset_index())
    k, n = pooled["mismatches"].to_numpy(), pooled["golden_correct"].to_numpy()
    low, high = sfi.confidence_sequence(k, n, confidence)
    w_low, w_high = wilson_interval(k, n, sfi.z_quantile(confidence))
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled["rate"] = np.where(n > 0, k / np.maximum(n, 1), np.nan)
    pooled["cs_low"], pooled["cs_high"], pooled["half_width"] = low, high, (np.asarray(high) - np.asarray(low)) / 2
    pooled["wilson_low"], pooled["wilson_high"] = w_low, w_high
    return pooled


def site_sizes(directory) -> dict[tuple[str, int], tuple[str, int]]:
    """(kind, site index) -> (type, elements) as the campaign recorded them in spec.json."""
    recorded = read_spec(directory).get("site_sizes")
    if not recorded:
        raise ValueError(f"{directory}: spec.json records no site sizes (written before they were recorded): "
                         "pass sizes to whole_model")
    return {(kind, int(i)): (v[0], int(v[1])) for kind, sites in recorded.items() for i, v in sites.items()}


def _bits_in(spec: str) -> int:
    """Bits a stratum's faults choose among: 1 for a fixed bit, else 32 (a random bit's width cancels
    when every stratum has one; mixed campaigns should pass sizes)."""
    return 1 if str(spec).isdigit() else 32


def whole_model(source: Source | pd.DataFrame, sizes: dict | None = None, confidence: float = 0.95,
                kind: str | None = None) -> sfi.StratifiedEstimate:
    """The population-weighted rate of the campaign's strata: the chance that one fault, drawn
    uniformly over every (element, bit) of the selected sites of ``kind`` (neuron or weight; the
    parameter vulnerability factor for weights), changes a correct prediction, with the Wilson
    interval at Kish's effective size (trainables.sfi.stratified_rate)."""
    trials = source if isinstance(source, pd.DataFrame) else load(source)
    if sizes is None:
        dirs = campaign_dirs(source) if not isinstance(source, pd.DataFrame) else sorted(set(trials["campaign_dir"]))
        if len(dirs) != 1:
            raise ValueError("whole_model: one campaign at a time")
        sizes = site_sizes(dirs[0])
    kinds = sorted(set(trials["kind"].astype(str)))
    if kind is None and len(kinds) > 1:
        raise ValueError(f"whole_model: the campaign has {', '.join(kinds)} sites: pass kind=")
    table = strata(trials[trials["kind"].astype(str) == (kind or kinds[0])], confidence)
    table = table[table["golden_correct"] > 0]
    weights = [sizes[(str(r.kind), int(r.site_index))][1] * _bits_in(r.bit_spec) for r in table.itertuples()]
    return sfi.stratified_rate(table["mismatches"], table["golden_correct"], weights, confidence)


def report_lines(directory) -> list[str]:
    """The statistical section of `report` for a campaign run with --margin or --allocate (its
    sfi.json): the uniform p = 0.5 plan, the achieved margin per stratum, injections spent vs that plan."""
    path = storage.join(directory, "sfi.json")
    if not storage.exists(path):
        return []
    record = json.loads(storage.read_bytes(path))
    confidence = float(record.get("confidence", 0.95))
    table = strata(directory, confidence)
    try:
        sizes = site_sizes(directory)
    except ValueError:
        sizes = None  # an older spec.json: no finite-population correction, no whole-model rate
    margin = record.get("margin") or float(table["half_width"].max())
    # golden-correct images of one whole pass (trials may have stopped early or been limited)
    per_trial = table["golden_correct"].sum() / max(table["images"].sum(), 1) * int(read_spec(directory).get("num_images") or 0)
    populations = [math.inf if sizes is None or per_trial < 1 else
                   sizes[(str(r.kind), int(r.site_index))][1] * _bits_in(r.bit_spec) * int(round(per_trial))
                   for r in table.itertuples()]
    uniform = [sfi.leveugle_sample_size(max(N, 1), margin, confidence, 0.5) for N in populations]
    spent = int(table["golden_correct"].sum())
    how = (f"--margin +/-{100 * margin:g} pp" if record["method"] == "margin"
           else f"--allocate {record['allocate']} of {record['budget']:,} injections ({record['pilot']:g} pilot)")
    lines = ["", f"statistical fault injection ({how}; intervals: {100 * confidence:g}% beta-binomial mixture "
                 "confidence sequence, valid under early stopping)"]
    shown = pd.DataFrame({
        "kind": table["kind"].astype(str), "site": table["site_index"], "type": table["site_type"].astype(str),
        "bit": table["bit_spec"].astype(str), "trials": table["trials"],
        "mismatches / correct": [f"{a} / {b}" for a, b in zip(table["mismatches"], table["golden_correct"])],
        "rate %": [f"{100 * r:.4f}" for r in table["rate"]],
        "CS %": [f"[{100 * a:.4f}, {100 * b:.4f}]" for a, b in zip(table["cs_low"], table["cs_high"])],
        "margin pp": [f"{100 * h:.3f}" for h in table["half_width"]],
        "uniform plan": uniform,
    })
    lines += shown.to_string(index=False).splitlines()
    reached = int((table["half_width"] < margin).sum())
    achieved = (f"{reached} of {len(table)} strata within +/-{100 * margin:g} pp" if record["method"] == "margin"
                else f"widest margin +/-{100 * margin:.3f} pp")
    lines.append(f"{achieved}; injections counted {spent:,} vs "
                 f"{sum(uniform):,} for the uniform p = 0.5 plan at that margin (Leveugle 2009): "
                 f"{100 * spent / max(sum(uniform), 1):.1f}%")
    if sizes is None:
        return lines + ["whole-model rate: spec.json records no site sizes (a campaign written before them)"]
    try:
        kinds = sorted(set(table["kind"].astype(str)))
        for kind in kinds:
            est = whole_model(directory, sizes, confidence, kind=kind)
            lines.append(f"whole-model {kind} rate (population-weighted over the strata): {100 * est.rate:.4f}% "
                         f"[{100 * est.low:.4f}, {100 * est.high:.4f}] ({100 * confidence:g}%, effective n "
                         f"{est.effective_n:,.0f})")
    except ValueError as exc:
        lines.append(f"whole-model rate: {exc}")
    return lines
