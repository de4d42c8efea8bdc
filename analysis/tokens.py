"""Tables and plots of teacher-forced (next-token) trials of causal LMs (rows with trial_kind
'teacher-forced'; trainables.inject.tokens defines the counts).

Counts and sums are pooled over trials (never rates averaged), per site or per flipped bit, within
one campaign identity (model, dataset, mode, kind, fault, ...), and only over teacher-forced rows:
classification rows never enter these tables, nor these rows the classification ones.

- ``sdc_rate`` (sequences with a changed top-1 and finite logits / sequences): Wilson 95% interval;
- ``token_change_rate`` (positions whose top-1 changed / positions), ``mean_log_ppl_ratio`` (mean over
  sequences of the faulty minus golden mean cross-entropy: the log of the perplexity ratio) and
  ``mean_kl`` (KL(golden || faulty) at the fault's token; the mean over positions for weight and param
  faults): Student-t 95% intervals over sequences, from the pooled sums and sums of squares (the
  continuous metrics over the sequences with finite logits).
"""
from __future__ import annotations

import math
from typing import Union

import numpy as np
import pandas as pd

from analysis.load import IDENTITY, OPTIONAL_IDENTITY, Source, load, load_bits, load_faults
from trainables.stats import wilson_interval

TRIAL_KIND = "teacher-forced"
COUNTS = ("sequences", "tokens", "token_changes", "token_changes_sq", "changed", "nonfinite", "sdc", "finite")
SUMS = ("log_ppl_ratio_sum", "log_ppl_ratio_sq_sum", "kl_sum", "kl_sq_sum")
SITE_KEYS = ("site_index", "site_name", "site_type")
Data = Union[pd.DataFrame, Source]

# two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom; the normal 1.96 beyond
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, then 1.96)."""
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def t_interval(total: float, total_sq: float, n: int) -> tuple[float, float, float]:
    """(mean, low, high): the mean of n values from their sum and sum of squares, with a Student-t
    95% interval (NaN bounds for n < 2)."""
    if n < 1:
        return float("nan"), float("nan"), float("nan")
    mean = total / n
    if n < 2:
        return mean, float("nan"), float("nan")
    var = max(total_sq - total * total / n, 0.0) / (n - 1)
    half = t_quantile(n - 1) * math.sqrt(var / n)
    return mean, mean - half, mean + half


def teacher_forced(frame: pd.DataFrame) -> pd.DataFrame:
    """The teacher-forced rows of a trials, bits or faults frame."""
    if "trial_kind" not in frame:
        return frame.iloc[:0]
    return frame[frame["trial_kind"].astype(object) == TRIAL_KIND]


def _identity(frame: pd.DataFrame) -> list[str]:
    return [c for c in (*IDENTITY, *OPTIONAL_IDENTITY) if c in frame.columns]


def _pooled(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Sum the counts and sums over ``keys`` groups and derive the rates, means and intervals."""
    if frame.empty:
        return pd.DataFrame(columns=[*keys, *COUNTS, "sdc_rate", "sdc_ci_low", "sdc_ci_high"])
    table = frame.groupby(keys, observed=True, sort=True, dropna=False)[[*COUNTS, *SUMS]].sum().reset_index()
    rows = []
    for r in table.itertuples(index=False):
        n, t = int(r.sequences), int(r.tokens)
        low, high = wilson_interval(int(r.sdc), n)
        per_seq = t / n if n else float("nan")  # positions per sequence
        tc = t_interval(r.token_changes / per_seq, r.token_changes_sq / per_seq ** 2, n) if n else (float("nan"),) * 3
        lp = t_interval(r.log_ppl_ratio_sum, r.log_ppl_ratio_sq_sum, int(r.finite))
        kl = t_interval(r.kl_sum, r.kl_sq_sum, int(r.finite))
        rows.append({"sdc_rate": r.sdc / n if n else float("nan"), "sdc_ci_low": low, "sdc_ci_high": high,
                     "nonfinite_rate": r.nonfinite / n if n else float("nan"),
                     "token_change_rate": tc[0], "token_change_ci_low": tc[1], "token_change_ci_high": tc[2],
                     "mean_log_ppl_ratio": lp[0], "log_ppl_ci_low": lp[1], "log_ppl_ci_high": lp[2],
                     "ppl_ratio": math.exp(min(lp[0], 709.0)) if lp[0] < 709.0 else float("inf") if np.isfinite(lp[0])
                     else float("nan"),  # exp of a huge mean log ratio: inf
                     "mean_kl": kl[0], "kl_ci_low": kl[1], "kl_ci_high": kl[2]})
    return pd.concat([table, pd.DataFrame(rows)], axis=1)


def per_site(data: Data) -> pd.DataFrame:
    """Teacher-forced outcomes pooled per site (and campaign identity)."""
    trials = teacher_forced(data if isinstance(data, pd.DataFrame) else load(data))
    return _pooled(trials, [*_identity(trials), *SITE_KEYS])


def per_bit(data: Data) -> pd.DataFrame:
    """Teacher-forced outcomes pooled per flipped bit (per-bit rows: random-bit trials split by bit)."""
    bits = teacher_forced(data if isinstance(data, pd.DataFrame) else load_bits(data))
    return _pooled(bits, [*_identity(bits), "bit"])


def _title(ident: dict) -> str:
    """model / dataset / mode / kind faults, then the optional identity values that differ from their default."""
    notes = [str(v) for c, v in ident.items() if c in OPTIONAL_IDENTITY and c != "trial_kind" and v != OPTIONAL_IDENTITY[c]]
    base = " / ".join(str(ident[c]) for c in IDENTITY if c in ident) + " faults, teacher-forced"
    return base + (f" ({'; '.join(notes)})" if notes else "")


def site_lines(table: pd.DataFrame) -> list[str]:
    """One line per site: ``Layer #k: a / n sequences = r% SDC [lo, hi], tokens changed x%, log ppl ratio
    m [lo, hi], KL m, non-finite f%, Type name``; a title line per identity."""
    lines: list[str] = []
    keys = _identity(table)
    for ident, rows in table.groupby(keys, observed=True, sort=True) if keys else [((), table)]:
        ident = ident if isinstance(ident, tuple) else (ident,)
        if lines:
            lines.append("")
        lines.append(_title(dict(zip(keys, ident))) + " (SDC: Wilson 95%, means: t 95% over sequences)")
        for r in rows.sort_values("site_index").itertuples(index=False):
            label = "Param" if str(getattr(r, "kind", "")) == "param" else "Layer"
            lines.append(
                f"{label} #{int(r.site_index)}: {int(r.sdc)} / {int(r.sequences)} sequences = {100 * r.sdc_rate:.4f}% SDC "
                f"[{100 * r.sdc_ci_low:.2f}, {100 * r.sdc_ci_high:.2f}], tokens changed {100 * r.token_change_rate:.3f}%, "
                f"log ppl ratio {r.mean_log_ppl_ratio:+.4g} [{r.log_ppl_ci_low:+.3g}, {r.log_ppl_ci_high:+.3g}], "
                f"KL {r.mean_kl:.4g}, non-finite {100 * r.nonfinite_rate:.3f}%, {r.site_type} {r.site_name}")
    return lines


def faults(source: Source) -> pd.DataFrame:
    """The teacher-forced per-fault records (campaigns run with --record)."""
    return teacher_forced(load_faults(source))


def plot_ppl_ratio(fault_rows: pd.DataFrame, path=None, ax=None):
    """The distribution of the per-sequence perplexity ratio (faulty / golden, log scale) of recorded
    faults with finite logits, one histogram per fault kind; masked faults (ratio exactly 1) are counted
    in the legend, not drawn. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = teacher_forced(fault_rows)
    rows = rows[~rows["nonfinite"].astype(bool) & np.isfinite(rows["log_ppl_ratio"].astype(float))]
    fig = ax.figure if ax is not None else plt.figure(figsize=(7, 4))
    ax = ax or fig.add_subplot(1, 1, 1)
    moved = rows[rows["log_ppl_ratio"].astype(float) != 0]
    with np.errstate(over="ignore"):
        ratios = np.exp(moved["log_ppl_ratio"].astype(float).to_numpy())
    ratios = ratios[np.isfinite(ratios)]
    if len(ratios):
        lo, hi = max(ratios.min(), 1e-300), ratios.max()
        edges = np.geomspace(lo, hi if hi > lo else lo * 1.001, 40)
        for kind, group in moved.groupby(moved["kind"].astype(str)):
            n_same = int(((rows["kind"].astype(str) == kind) & (rows["log_ppl_ratio"].astype(float) == 0)).sum())
            with np.errstate(over="ignore"):
                values = np.exp(group["log_ppl_ratio"].astype(float).to_numpy())
            ax.hist(values[np.isfinite(values)], bins=edges, alpha=0.6,
                    label=f"{kind}: {len(group)} moved, {n_same} exactly 1")
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("perplexity ratio, faulty / golden (per sequence)")
    ax.set_ylabel("faults")
    ax.set_title("Teacher-forced faults: perplexity ratio")
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def _bit_lines(table: pd.DataFrame) -> list[str]:
    shown = pd.DataFrame({
        "bit": table["bit"].astype(int).to_numpy(), "sequences": table["sequences"].astype(int).to_numpy(),
        "SDC %": [f"{100 * r:.4f}" for r in table["sdc_rate"]],
        "SDC 95% CI %": [f"[{100 * a:.2f}, {100 * b:.2f}]" for a, b in zip(table["sdc_ci_low"], table["sdc_ci_high"])],
        "tokens changed %": [f"{100 * r:.4f}" for r in table["token_change_rate"]],
        "log ppl ratio": [f"{m:+.4g}" for m in table["mean_log_ppl_ratio"]],
        "KL": [f"{m:.4g}" for m in table["mean_kl"]],
        "non-finite %": [f"{100 * r:.4f}" for r in table["nonfinite_rate"]]})
    return shown.to_string(index=False).splitlines() if len(shown) else ["(no rows)"]


def report_lines(trials: pd.DataFrame, bits: pd.DataFrame, directories, out) -> tuple[list[str], list]:
    """The teacher-forced section of ``campaign report``: per-site lines, the per-bit table, their CSVs
    and, where faults were recorded, the perplexity-ratio plot. Returns (lines, files written)."""
    from pathlib import Path

    out = Path(out)
    site_table, bit_table = per_site(trials), per_bit(bits)
    written = []
    for name, table in (("lm_per_site", site_table), ("lm_per_bit", bit_table)):
        table.to_csv(out / f"{name}.csv", index=False)
        written.append(out / f"{name}.csv")
    lines = ["Teacher-forced (next-token) trials, per site: sequence SDC rate (changed top-1, finite logits) with",
             "its Wilson 95% interval; positions whose top-1 changed; mean log perplexity ratio (faulty - golden",
             "cross-entropy per sequence) with a Student-t 95% interval over sequences; mean KL(golden || faulty)",
             "at the fault's token (weight and param faults: mean over positions).", "", *site_lines(site_table), ""]
    for ident, rows in bit_table.groupby(_identity(bit_table), observed=True, sort=True) if len(bit_table) else []:
        ident = ident if isinstance(ident, tuple) else (ident,)
        lines += ["Per bit position: " + _title(dict(zip(_identity(bit_table), ident))), *_bit_lines(rows.sort_values("bit")), ""]
    try:
        recorded = faults(directories)
        recorded = recorded[recorded["trial_key"].isin(set(trials["trial_key"]))]  # the trials the tables count
    except (ValueError, FileNotFoundError):
        recorded = pd.DataFrame()
    if len(recorded):
        import matplotlib.pyplot as plt

        fig = plot_ppl_ratio(recorded, out / "lm_ppl_ratio.png")
        plt.close(fig)
        written.append(out / "lm_ppl_ratio.png")
    else:
        lines.append("(no per-fault records: run with --record all for the perplexity-ratio plot)")
    return lines, written
