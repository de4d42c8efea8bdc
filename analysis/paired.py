"""Protected campaigns (``--protect``): unprotected and protected rates of the same faults
side by side, with Wilson intervals, the reduction, the exact McNemar p-value of the paired
outcomes, the seed's four accuracies and range-check detection. Imports neither torch nor ray.

Counts are summed over trials (seeds, bits), never rates averaged. Both rates count against
the unprotected model's clean prediction over its golden-correct images, as the seed did.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import pandas as pd

from analysis.load import IDENTITY
from trainables.stats import mcnemar_exact, mcnemar_log10, wilson_interval

SITE_KEYS = ("site_index", "site_name", "site_type")
PAIR_COUNTS = ("pair_both", "pair_unprotected_only", "pair_protected_only")
TRIAL_COUNTS = ("images", "golden_correct", "mismatches", "protected_mismatches", *PAIR_COUNTS, "faulty_correct",
                "protected_faulty_correct", "protected_clean_correct", "detected", "detected_mismatches", "clean_alarms")
BIT_COUNTS = ("images", "golden_correct", "mismatches", "protected_mismatches", *PAIR_COUNTS)
TRIAL_MATCH = ("model", "dataset", "mode", "kind", "site_index", "bit_spec", "seed", "images")


def is_protected(frame: pd.DataFrame) -> pd.Series:
    """Per row: a paired trial (or per-bit row) of a protected campaign."""
    if "protect" in frame:  # "none" (analysis.load's default) or null: an unprotected campaign
        return frame["protect"].notna() & frame["protect"].astype(object).ne("none")
    if "protected_mismatches" in frame:  # per-bit rows carry the counts only
        return frame["protected_mismatches"].notna()
    return pd.Series(False, index=frame.index)


def _rates(table: pd.DataFrame) -> pd.DataFrame:
    n = table["golden_correct"].to_numpy(dtype=np.float64)
    u = table["mismatches"].to_numpy(dtype=np.float64)
    p = table["protected_mismatches"].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["rate"] = np.where(n > 0, u / n, np.nan)
        table["protected_rate"] = np.where(n > 0, p / n, np.nan)
        table["reduction"] = table["rate"] - table["protected_rate"]
        table["relative_reduction"] = np.where(u > 0, 1 - p / u, np.nan)
    table["ci_low"], table["ci_high"] = wilson_interval(u, n)
    table["protected_ci_low"], table["protected_ci_high"] = wilson_interval(p, n)
    table["mcnemar_p"] = [mcnemar_exact(b, c) for b, c in
                          zip(table["pair_unprotected_only"], table["pair_protected_only"])]
    table["mcnemar_log10_p"] = [mcnemar_log10(b, c) for b, c in  # finite where mcnemar_p underflows to 0.0
                                zip(table["pair_unprotected_only"], table["pair_protected_only"])]
    if "faulty_correct" in table:
        images = table["images"].to_numpy(dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            table["accuracy"] = table["golden_correct"] / images
            table["corrupted_accuracy"] = table["faulty_correct"] / images
            table["robust_accuracy"] = table["protected_clean_correct"] / images
            table["corrupted_robust_accuracy"] = table["protected_faulty_correct"] / images
            table["detected_rate"] = table["detected"] / images
            table["detected_share_of_mismatches"] = np.where(u > 0, table["detected_mismatches"] / u, np.nan)
            table["false_alarm_rate"] = table["clean_alarms"] / images
    return table


def protection_table(frame: pd.DataFrame, by: str = "site") -> pd.DataFrame:
    """The paired rows of ``frame`` (trials for by='site', per-bit rows for by='bit') pooled per
    campaign identity, protection and site (or bit): counts, both rates with Wilson intervals,
    ``reduction`` (rate minus protected rate), ``relative_reduction``, ``mcnemar_p``; per site
    also the four accuracies, detection and false alarms."""
    if by not in ("site", "bit"):
        raise ValueError(f"by must be 'site' or 'bit', not {by!r}")
    rows = frame[is_protected(frame)]
    if rows.empty:
        raise ValueError("no paired trials: these campaigns ran without --protect")
    keys = list(SITE_KEYS) if by == "site" else ["bit"]
    counts = TRIAL_COUNTS if by == "site" else BIT_COUNTS
    group = [c for c in ("campaign", *IDENTITY, "protect") if c in rows] + keys
    table = rows.groupby(group, observed=True, sort=True, dropna=False)[list(counts)].sum().reset_index()
    table["trials"] = rows.groupby(group, observed=True, sort=True, dropna=False).size().to_numpy()
    return _rates(table)


def pair_campaigns(unprotected: pd.DataFrame, protected: pd.DataFrame) -> pd.DataFrame:
    """Pair an unprotected campaign's trials with a protected campaign's of the same model,
    sites, bits and seeds. Their faults are the same lists, so each unprotected trial must
    count exactly the mismatches of the protected trial's unprotected half (ValueError
    otherwise). Returns the protected trials that have a partner, with ``unprotected_campaign``."""
    keys = [c for c in TRIAL_MATCH if c in unprotected and c in protected]
    left = unprotected[~is_protected(unprotected)]
    right = protected[is_protected(protected)]
    cols = keys + ["campaign", "mismatches", "golden_correct"]
    as_objects = {k: object for k in keys}  # categorical or string columns of different campaigns
    merged = right.astype(as_objects).merge(left[cols].astype(as_objects), how="inner", on=keys,
                                            suffixes=("", "_unprotected"))
    if merged.empty:
        raise ValueError("the campaigns share no trial (model, data set, mode, kind, site, bit, seed and images must match)")
    differ = merged[(merged["mismatches"] != merged["mismatches_unprotected"])
                    | (merged["golden_correct"] != merged["golden_correct_unprotected"])]
    if len(differ):
        first = differ.iloc[0]
        raise ValueError(f"the campaigns did not draw the same faults: {len(differ)} paired trial(s) differ, e.g. "
                         f"{first['kind']} site {first['site_index']} bit {first['bit_spec']} seed {first['seed']}: "
                         f"{first['mismatches_unprotected']} mismatches unprotected, {first['mismatches']} in the "
                         f"protected campaign's unprotected half")
    return merged.rename(columns={"campaign_unprotected": "unprotected_campaign"}).drop(
        columns=["mismatches_unprotected", "golden_correct_unprotected"])


def compare_protected(frames: Sequence[pd.DataFrame], by: str) -> pd.DataFrame | None:
    """analysis.compare for protected campaigns: None when no frame holds paired trials.
    An unprotected campaign given beside a protected one is paired with it (pair_campaigns)
    and named in ``.attrs['paired_with']``."""
    if by not in ("site", "bit") or not any(is_protected(f).any() for f in frames):
        return None
    frame = pd.concat(list(frames), ignore_index=True)
    protected, plain = frame[is_protected(frame)], frame[~is_protected(frame)]
    paired_with = []
    if len(plain):
        if by == "bit":
            matched = set(pair_campaigns(_trial_level(plain), _trial_level(protected))["trial_key"])
            protected = protected[protected["trial_key"].isin(matched)]
        else:
            protected = pair_campaigns(plain, protected)
        paired_with = sorted(set(plain["campaign"].astype(str)))
    table = protection_table(protected, by)
    table.attrs["paired_with"] = paired_with
    return table


def _trial_level(bits: pd.DataFrame) -> pd.DataFrame:
    """Per-bit rows summed back to one row per trial (for matching campaigns by trial)."""
    keys = [c for c in ("campaign", "trial_key", *TRIAL_MATCH[:-1], "protect") if c in bits]
    out = bits.astype({k: object for k in keys}).groupby(keys, dropna=False)[["images", "golden_correct", "mismatches"]].sum()
    return out.reset_index().replace({None: np.nan}) if "protect" in keys else out.reset_index()


def seed_protection_lines(table: pd.DataFrame) -> list[str]:
    """The seed's text for a protected campaign: per site two lines, unprotected then protected,
    ``Layer #{k}: {a} / {b} = {r:.4f}%, {Type}`` and ``Layer #{k} protected: {c} / {b} = ...``,
    then the four accuracies of the campaign."""
    lines: list[str] = []
    group = [c for c in ("campaign", *IDENTITY, "protect") if c in table]
    for ident, rows in table.groupby(group, observed=True, sort=False, dropna=False):
        ident = dict(zip(group, ident if isinstance(ident, tuple) else (ident,)))
        if lines:
            lines.append("")
        lines.append(" / ".join(str(ident[c]) for c in group if c in ident) + " (unprotected, then protected)")
        for row in rows.sort_values("site_index").itertuples(index=False):
            b = int(row.golden_correct)
            for label, a in (("", int(row.mismatches)), (" protected", int(row.protected_mismatches))):
                r = 100.0 * a / b if b else float("nan")
                lines.append(f"Layer #{int(row.site_index)}{label}: {a} / {b} = {r:.4f}%, {row.site_type}")
        if "faulty_correct" in rows:
            s = rows[list(TRIAL_COUNTS)].sum()
            acc = lambda k: 100.0 * s[k] / s["images"]  # noqa: E731
            lines.append(f"Accuracy: original {acc('golden_correct'):.2f}%, corrupted {acc('faulty_correct'):.2f}%, "
                         f"robust {acc('protected_clean_correct'):.2f}%, corrupted-robust "
                         f"{acc('protected_faulty_correct'):.2f}%")
    return lines


def format_protection(table: pd.DataFrame) -> list[str]:
    """A fixed-width text table: per site both rates with Wilson intervals, reduction, McNemar p."""
    key = "site_index" if "site_index" in table else "bit"
    head = f"{key:>10}  {'type':>12}  {'unprotected (95% CI)':>26}  {'protected (95% CI)':>26}  {'reduction':>9}  {'b':>6}  {'c':>6}  {'McNemar p':>9}"
    lines = [head, "-" * len(head)]
    pct = lambda x: f"{100 * x:.2f}"  # noqa: E731
    for row in table.itertuples(index=False):
        kind = getattr(row, "site_type", "")
        lines.append(f"{getattr(row, key):>10}  {str(kind):>12}  "
                     f"{pct(row.rate) + '% [' + pct(row.ci_low) + ', ' + pct(row.ci_high) + ']':>26}  "
                     f"{pct(row.protected_rate) + '% [' + pct(row.protected_ci_low) + ', ' + pct(row.protected_ci_high) + ']':>26}  "
                     f"{pct(row.reduction) + ' pt':>9}  {int(row.pair_unprotected_only):>6}  {int(row.pair_protected_only):>6}  "
                     f"{_p_text(row.mcnemar_p, row.mcnemar_log10_p):>9}")
    return lines


def _p_text(p: float, log10_p: float) -> str:
    """A p-value for text tables, from its log10 where the double underflows (1.4e-1062)."""
    if p > 0 or not np.isfinite(log10_p):
        return f"{p:.2g}"
    exponent = int(np.floor(log10_p))
    mantissa = round(10 ** (log10_p - exponent), 1)
    if mantissa >= 10:
        mantissa, exponent = 1.0, exponent + 1
    return f"{mantissa:.1f}e{exponent}"


def plot_protection(table: pd.DataFrame, path: Union[str, Path]) -> Path:
    """Unprotected and protected misclassification rate per site, with Wilson 95% error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.sort_values("site_index")
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(rows) + 2), 4))
    for offset, rate, lo, hi, label in ((-0.18, "rate", "ci_low", "ci_high", "unprotected"),
                                        (0.18, "protected_rate", "protected_ci_low", "protected_ci_high",
                                         f"protected ({rows['protect'].iloc[0]})")):
        r = 100 * rows[rate].to_numpy(dtype=float)
        err = np.vstack([r - 100 * rows[lo].to_numpy(dtype=float), 100 * rows[hi].to_numpy(dtype=float) - r])
        ax.bar(x + offset, r, width=0.36, yerr=err, capsize=2, label=label)
    ax.set_xticks(x, [f"#{i} {t}" for i, t in zip(rows["site_index"], rows["site_type"])], rotation=60, ha="right",
                  fontsize=8)
    ax.set_ylabel("misclassification rate (%)")
    ax.set_title(f"{rows['model'].iloc[0]} / {rows['mode'].iloc[0]}: same faults, without and with protection"
                 if "model" in rows else "same faults, without and with protection", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_lines(trials: pd.DataFrame, out: Path) -> tuple[list[str], list[Path]]:
    """The protection section of ``campaign report`` (text, files written) or nothing."""
    if not is_protected(trials).any():
        return [], []
    table = protection_table(trials)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "protection.csv", index=False)
    written = [out / "protection.csv", plot_protection(table, out / "protection.png")]
    lines = ["Protection: the same faults without and with protection (rates against the unprotected clean",
             "prediction over its golden-correct images; b / c = changed only without / only with protection):", "",
             *format_protection(table), "", *seed_protection_lines(table), ""]
    return lines, written
