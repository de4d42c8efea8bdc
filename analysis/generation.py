"""Tables and the SDC-rate-vs-decode-step plot of generation trials of causal LMs (rows with
trial_kind 'generation'; trainables.inject.generation defines the counts).

Counts and sums are pooled over trials (never rates averaged), per site, per flipped bit or per
decode step, within one campaign identity (model, dataset, mode, kind, fault, ...) and one
``new_tokens``, and only over generation rows: teacher-forced and classification rows never enter
these tables, nor these rows theirs.

- ``sdc_rate`` (continuations that differ from the golden one with finite logits / faults) and
  ``nonfinite_rate``: Wilson 95% intervals over faults;
- ``mean_edit_distance`` (Levenshtein distance to the golden continuation / new_tokens, 0 for an
  identical one) over faults, ``mean_first_divergence`` (the first differing position) over the
  changed faults: Student-t 95% intervals from the pooled sums and sums of squares;
- per decode step (the fault's step; weight and param faults have none): faults, SDCs and
  non-finite runs summed from the trials' per-step counts, the SDC rate with its Wilson interval.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import pandas as pd

from analysis.load import IDENTITY, OPTIONAL_IDENTITY, Source, load, load_bits, load_faults
from analysis.tokens import t_interval
from trainables.stats import wilson_interval

TRIAL_KIND = "generation"
COUNTS = ("images", "identical", "changed", "sdc", "nonfinite", "effective")
SUMS = ("first_divergence_sum", "first_divergence_sq_sum", "edit_distance_sum", "edit_distance_sq_sum")
STEP_COLUMNS = ("faults_by_step", "sdc_by_step", "nonfinite_by_step")
SITE_KEYS = ("site_index", "site_name", "site_type")
Data = Union[pd.DataFrame, Source]


def generation(frame: pd.DataFrame) -> pd.DataFrame:
    """The generation rows of a trials, bits or faults frame."""
    if "trial_kind" not in frame:
        return frame.iloc[:0]
    return frame[frame["trial_kind"].astype(object) == TRIAL_KIND]


def _identity(frame: pd.DataFrame) -> list[str]:
    keys = [c for c in (*IDENTITY, *OPTIONAL_IDENTITY) if c in frame.columns]
    return keys + (["new_tokens"] if "new_tokens" in frame.columns and frame["new_tokens"].notna().all() else [])


def _rates(faults: int, sdc: int, nonfinite: int) -> dict:
    low, high = wilson_interval(int(sdc), int(faults))
    nf_low, nf_high = wilson_interval(int(nonfinite), int(faults))
    rate = (lambda k: k / faults if faults else float("nan"))  # noqa: E731
    return {"sdc_rate": rate(sdc), "sdc_ci_low": low, "sdc_ci_high": high, "nonfinite_rate": rate(nonfinite),
            "nonfinite_ci_low": nf_low, "nonfinite_ci_high": nf_high}


def _pooled(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Sum the counts and sums over ``keys`` groups and derive the rates, means and intervals."""
    if frame.empty:
        return pd.DataFrame(columns=[*keys, "faults", *COUNTS[1:], "sdc_rate", "sdc_ci_low", "sdc_ci_high"])
    table = frame.groupby(keys, observed=True, sort=True, dropna=False)[[*COUNTS, *SUMS]].sum().reset_index()
    table = table.rename(columns={"images": "faults"})
    rows = []
    for r in table.itertuples(index=False):
        n, changed = int(r.faults), int(r.changed)
        edit = t_interval(r.edit_distance_sum, r.edit_distance_sq_sum, n)
        first = t_interval(r.first_divergence_sum, r.first_divergence_sq_sum, changed)
        rows.append({**_rates(n, r.sdc, r.nonfinite), "identical_rate": r.identical / n if n else float("nan"),
                     "mean_edit_distance": edit[0], "edit_ci_low": edit[1], "edit_ci_high": edit[2],
                     "mean_first_divergence": first[0], "first_divergence_ci_low": first[1],
                     "first_divergence_ci_high": first[2]})
    return pd.concat([table, pd.DataFrame(rows)], axis=1)


def per_site(data: Data) -> pd.DataFrame:
    """Generation outcomes pooled per site (and campaign identity, new_tokens), over decode steps and seeds."""
    trials = generation(data if isinstance(data, pd.DataFrame) else load(data))
    return _pooled(trials, [*_identity(trials), *SITE_KEYS])


def per_bit(data: Data) -> pd.DataFrame:
    """Generation outcomes pooled per flipped bit (per-bit rows: random-bit trials split by the first bit flipped)."""
    bits = generation(data if isinstance(data, pd.DataFrame) else load_bits(data))
    return _pooled(bits, [*_identity(bits), "bit"])


def per_step(data: Data) -> pd.DataFrame:
    """Faults, SDCs and non-finite runs per decode step of the fault (neuron and kv trials; a listed
    step's trial counts at its step, a random-step trial at each step it drew), pooled per identity."""
    trials = generation(data if isinstance(data, pd.DataFrame) else load(data))
    keys = _identity(trials)
    columns = [*keys, "step", "faults", "sdc", "nonfinite", "sdc_rate", "sdc_ci_low", "sdc_ci_high"]
    rows = []
    for ident, group in trials.groupby(keys, observed=True, sort=True) if len(trials) else []:
        ident = ident if isinstance(ident, tuple) else (ident,)
        arrays = {c: [np.asarray(v, dtype=np.int64) for v in group[c] if v is not None and len(v)] for c in STEP_COLUMNS}
        if not arrays["faults_by_step"]:
            continue
        totals = {c: np.sum(np.stack(arrays[c]), axis=0) for c in STEP_COLUMNS}
        for step in np.nonzero(totals["faults_by_step"])[0].tolist():
            n, sdc, bad = (int(totals[c][step]) for c in STEP_COLUMNS)
            rate = _rates(n, sdc, bad)
            rows.append({**dict(zip(keys, ident)), "step": step, "faults": n, "sdc": sdc, "nonfinite": bad,
                         **{k: rate[k] for k in ("sdc_rate", "sdc_ci_low", "sdc_ci_high")}})
    return pd.DataFrame(rows, columns=columns)


def _title(ident: dict) -> str:
    notes = [str(v) for c, v in ident.items() if c in OPTIONAL_IDENTITY and c != "trial_kind" and v != OPTIONAL_IDENTITY[c]]
    base = " / ".join(str(ident[c]) for c in IDENTITY if c in ident) + " faults, generation"
    if "new_tokens" in ident:
        base += f" of {int(ident['new_tokens'])} tokens"
    return base + (f" ({'; '.join(notes)})" if notes else "")


def site_lines(table: pd.DataFrame) -> list[str]:
    """One line per site: ``Layer #k: a / n faults = r% SDC [lo, hi], identical x%, non-finite y%, edit
    distance m [lo, hi], first divergence d, Type name``; a title line per identity."""
    lines: list[str] = []
    keys = _identity(table)
    for ident, rows in table.groupby(keys, observed=True, sort=True) if keys and len(table) else []:
        ident = ident if isinstance(ident, tuple) else (ident,)
        if lines:
            lines.append("")
        lines.append(_title(dict(zip(keys, ident))) + " (SDC: Wilson 95%, means: t 95%)")
        for r in rows.sort_values("site_index").itertuples(index=False):
            label = {"param": "Param", "kv": "KV"}.get(str(getattr(r, "kind", "")), "Layer")
            first = "-" if pd.isna(r.mean_first_divergence) else f"{r.mean_first_divergence:.3g}"
            lines.append(
                f"{label} #{int(r.site_index)}: {int(r.sdc)} / {int(r.faults)} faults = {100 * r.sdc_rate:.4f}% SDC "
                f"[{100 * r.sdc_ci_low:.2f}, {100 * r.sdc_ci_high:.2f}], identical {100 * r.identical_rate:.2f}%, "
                f"non-finite {100 * r.nonfinite_rate:.2f}%, edit distance {r.mean_edit_distance:.4g} "
                f"[{r.edit_ci_low:.3g}, {r.edit_ci_high:.3g}], first divergence {first}, {r.site_type} {r.site_name}")
    return lines


def _bit_lines(table: pd.DataFrame) -> list[str]:
    shown = pd.DataFrame({
        "bit": table["bit"].astype(int).to_numpy(), "faults": table["faults"].astype(int).to_numpy(),
        "SDC %": [f"{100 * r:.4f}" for r in table["sdc_rate"]],
        "SDC 95% CI %": [f"[{100 * a:.2f}, {100 * b:.2f}]" for a, b in zip(table["sdc_ci_low"], table["sdc_ci_high"])],
        "identical %": [f"{100 * r:.2f}" for r in table["identical_rate"]],
        "non-finite %": [f"{100 * r:.4f}" for r in table["nonfinite_rate"]],
        "edit distance": [f"{m:.4g}" for m in table["mean_edit_distance"]]})
    return shown.to_string(index=False).splitlines() if len(shown) else ["(no rows)"]


def _step_lines(table: pd.DataFrame) -> list[str]:
    shown = pd.DataFrame({
        "step": table["step"].astype(int).to_numpy(), "faults": table["faults"].astype(int).to_numpy(),
        "SDC": table["sdc"].astype(int).to_numpy(), "SDC %": [f"{100 * r:.4f}" for r in table["sdc_rate"]],
        "SDC 95% CI %": [f"[{100 * a:.2f}, {100 * b:.2f}]" for a, b in zip(table["sdc_ci_low"], table["sdc_ci_high"])],
        "non-finite": table["nonfinite"].astype(int).to_numpy()})
    return shown.to_string(index=False).splitlines() if len(shown) else ["(no rows)"]


def plot_sdc_by_step(step_table: pd.DataFrame, path=None, ax=None):
    """The SDC rate against the decode step of the fault (0 = the prefill), one line per fault kind
    (and identity), with Wilson 95% bars. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = ax.figure if ax is not None else plt.figure(figsize=(7, 4))
    ax = ax or fig.add_subplot(1, 1, 1)
    keys = _identity(step_table)
    others = [c for c in keys if c != "kind" and step_table[c].astype(str).nunique() > 1]  # named where they differ
    for ident, rows in step_table.groupby(keys, observed=True, sort=True) if keys and len(step_table) else []:
        ident = dict(zip(keys, ident if isinstance(ident, tuple) else (ident,)))
        rows = rows.sort_values("step")
        rate = rows["sdc_rate"].to_numpy(dtype=float)
        err = np.vstack([rate - rows["sdc_ci_low"].to_numpy(dtype=float), rows["sdc_ci_high"].to_numpy(dtype=float) - rate])
        label = f"{ident.get('kind')}" + (f" ({', '.join(str(ident.get(c)) for c in others)})" if others else "")
        ax.errorbar(rows["step"].to_numpy(), 100 * rate, yerr=100 * err, marker="o", capsize=3, label=label)
    ax.set_xlabel("decode step of the fault (0 = prefill)")
    ax.set_ylabel("SDC rate % (Wilson 95%)")
    ax.set_title("Generation faults: SDC rate against decode step")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def faults(source: Source) -> pd.DataFrame:
    """The generation per-fault records (campaigns run with --record)."""
    return generation(load_faults(source))


def report_lines(trials: pd.DataFrame, bits: pd.DataFrame, out) -> tuple[list[str], list]:
    """The generation section of ``campaign report``: per-site lines, the per-bit and per-step tables,
    their CSVs and the SDC-rate-vs-decode-step plot. Returns (lines, files written)."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    out = Path(out)
    if "new_tokens" in trials and "new_tokens" not in bits:  # per-bit rows take their trial's new_tokens
        join = [c for c in ("campaign_dir", "trial_key") if c in trials and c in bits]
        bits = bits.merge(trials[[*join, "new_tokens"]].drop_duplicates(join), on=join, how="left")
    site_table, bit_table, step_table = per_site(trials), per_bit(bits), per_step(trials)
    written = []
    for name, table in (("gen_per_site", site_table), ("gen_per_bit", bit_table), ("gen_per_step", step_table)):
        table.to_csv(out / f"{name}.csv", index=False)
        written.append(out / f"{name}.csv")
    lines = ["Generation trials (greedy decoding), per site: SDC rate (continuation differs from the golden one,",
             "finite logits at every step) with its Wilson 95% interval; identical continuations; non-finite runs;",
             "mean normalized edit distance to the golden continuation (t 95% over faults); mean first diverging",
             "position (over the changed faults).", "", *site_lines(site_table), ""]
    keys = _identity(bit_table)
    for ident, rows in bit_table.groupby(keys, observed=True, sort=True) if len(bit_table) else []:
        ident = ident if isinstance(ident, tuple) else (ident,)
        lines += ["Per bit position: " + _title(dict(zip(keys, ident))), *_bit_lines(rows.sort_values("bit")), ""]
    keys = _identity(step_table)
    for ident, rows in step_table.groupby(keys, observed=True, sort=True) if len(step_table) else []:
        ident = ident if isinstance(ident, tuple) else (ident,)
        lines += ["Per decode step of the fault: " + _title(dict(zip(keys, ident))), *_step_lines(rows.sort_values("step")),
                  ""]
    fig = plot_sdc_by_step(step_table, out / "gen_sdc_by_step.png")
    plt.close(fig)
    written.append(out / "gen_sdc_by_step.png")
    if step_table.empty:
        lines.append("(no neuron or kv faults: the SDC-rate-vs-step plot is empty)")
    return lines, written
