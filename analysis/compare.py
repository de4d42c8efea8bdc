"""Side-by-side comparison of two or more campaigns (fp32 vs bf16, model A vs B, neuron vs weight).

Each *side* is one campaign identity (campaign, model, dataset, mode, kind; and bit sampling for
site/type): a directory holding both fault kinds gives two sides. The first side is the baseline.
"""
from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
import pandas as pd

from analysis.load import IDENTITY, OPTIONAL_IDENTITY, campaign_dirs, load, load_bits
from analysis.paired import compare_protected
from analysis.tables import FIELDS, SAMPLING, SITE_KEYS, groups, per_bit, per_bit_field, per_site, per_type

Item = Union[pd.DataFrame, str, "os.PathLike[str]"]
BY = {"site": SITE_KEYS, "bit": ("bit",), "field": ("field",), "type": ("site_type",)}
TABLES = {"site": per_site, "bit": per_bit, "field": per_bit_field, "type": per_type}
SIDE_COLUMNS = ("misclassification_rate", "ci_low", "ci_high", "mismatches", "golden_correct")


def _frames(items: Union[Item, Sequence[Item]], by: str) -> list[pd.DataFrame]:
    """Load each directory on its own (bits rows for by='bit'); frames pass through."""
    if isinstance(items, (pd.DataFrame, str, os.PathLike)):
        items = [items]
    frames = []
    for item in items:
        if isinstance(item, pd.DataFrame):
            frames.append(item)
        else:
            for directory in campaign_dirs(item):
                frames.append(load_bits(directory) if by in ("bit", "field") else load(directory))
    return frames


def _table(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    """The pooled table of one input, per campaign, its campaigns in order of first appearance."""
    table = TABLES[by](frame, by_campaign="campaign" in frame)
    if "campaign" in table:
        order = {name: i for i, name in enumerate(pd.unique(frame["campaign"].astype(object)))}
        table = table.iloc[np.argsort([order[c] for c in table["campaign"].astype(object)], kind="stable")]
    return table


def _label_sides(tables: list[pd.DataFrame]) -> list[tuple[str, dict, pd.DataFrame]]:
    """Split tables into sides and name each: the campaign name, plus the identity values
    that vary within that campaign, plus ' #n' if a name repeats."""
    sides = [side for table in tables for side in groups(table)]
    labels = []
    for ident, _ in sides:
        same = [other for other, _ in sides if other.get("campaign") == ident.get("campaign")]
        varying = [c for c in (*IDENTITY, *OPTIONAL_IDENTITY, SAMPLING) if len({o.get(c) for o in same}) > 1]
        labels.append("/".join([ident.get("campaign") or "?"] + [str(ident[c]) for c in varying]))
    out, seen = [], {}
    for label, (ident, rows) in zip(labels, sides):
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label} #{seen[label]}", ident, rows))
    return out


def _overlap(lo_a, hi_a, lo_b, hi_b) -> pd.Series:
    """Whether [lo_a, hi_a] and [lo_b, hi_b] intersect; NA where a bound is missing."""
    known = lo_a.notna() & hi_a.notna() & lo_b.notna() & hi_b.notna()
    result = (lo_a <= hi_b) & (lo_b <= hi_a)
    return result.astype("boolean").where(known, pd.NA)


def compare(items: Union[Item, Sequence[Item]], by: str = "site") -> pd.DataFrame:
    """Two or more campaigns side by side, per site, bit, bit field or layer type.

    Items are campaign directories or frames (trials; per-bit rows for by='bit' or 'field'). A
    frame holding several campaigns gives one side each, in order of appearance. Columns: the
    key, then per side ``rate[L]``, ``ci_low[L]``, ``ci_high[L]``, ``mismatches[L]``,
    ``golden_correct[L]``, and for every side after the first (the baseline) ``diff[L]``
    (rate minus the baseline's, a fraction) and ``overlap[L]`` (Wilson intervals intersect).
    ``.attrs['sides']`` maps each label L to its identity.

    Protected campaigns (``--protect``) give analysis.paired's table instead (by 'site' or 'bit'):
    unprotected and protected rates of the same faults, the reduction and the McNemar p; an
    unprotected campaign given beside one is checked to hold the same faults and paired with it.
    """
    if by not in BY:
        raise ValueError(f"by must be one of {sorted(BY)}, not {by!r}")
    keys = list(BY[by])
    frames = _frames(items, by)
    paired = compare_protected(frames, by)  # protected campaigns: paired rates and McNemar (analysis.paired)
    if paired is not None:
        return paired
    sides = _label_sides([_table(f, by) for f in frames])
    if len(sides) < 2:
        raise ValueError(f"compare needs two or more campaigns (or kinds/modes), got {len(sides)}")
    merged = None
    for label, _, rows in sides:
        part = rows[keys + list(SIDE_COLUMNS)].copy()
        for k in keys:
            part[k] = part[k].astype(object)
        part = part.rename(columns={c: f"{'rate' if c == 'misclassification_rate' else c}[{label}]" for c in SIDE_COLUMNS})
        merged = part if merged is None else merged.merge(part, on=keys, how="outer")
    base = sides[0][0]
    for label, _, _ in sides[1:]:
        merged[f"diff[{label}]"] = merged[f"rate[{label}]"] - merged[f"rate[{base}]"]
        merged[f"overlap[{label}]"] = _overlap(merged[f"ci_low[{base}]"], merged[f"ci_high[{base}]"],
                                               merged[f"ci_low[{label}]"], merged[f"ci_high[{label}]"])
    for label, _, _ in sides:
        for c in ("mismatches", "golden_correct"):
            merged[f"{c}[{label}]"] = merged[f"{c}[{label}]"].astype("Int64")
    text = pd.StringDtype(na_value=np.nan)
    for k in keys:
        merged[k] = merged[k].astype("int64" if k in ("site_index", "bit") else text)
    if by == "field":
        merged["field"] = pd.Categorical(merged["field"], categories=list(FIELDS), ordered=True)
    merged = merged.sort_values(keys, kind="stable").reset_index(drop=True)
    merged.attrs["sides"] = {label: ident for label, ident, _ in sides}
    return merged
