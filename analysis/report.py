"""The campaign report: text tables, CSV tables, the seed-layout CSV and PNG plots.

``run(dirs, out_dir)`` is what ``python -m campaign report DIR [DIR...] [--out OUT]`` calls;
it returns the text and writes every file into ``out_dir`` (default ``<first dir>/report``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from analysis import generation as generation_tables
from analysis import stream
from analysis import tokens as token_tables
from analysis.compare import compare
from analysis.load import campaign_dirs, golden_warnings, load, load_bits
from analysis.paired import report_lines as report_protection
from analysis.sfi import report_lines as sfi_report_lines
from analysis.plots import plot_bit_rates, plot_site_bit_heatmap, plot_site_rates
from analysis.tables import (
    FORMATS,
    group_title,
    groups,
    identity_columns,
    per_bit,
    per_bit_field,
    per_seed,
    per_site,
    per_type,
    seed_layer_lines,
    site_by_bit,
    write_seed_csv,
)
from trainables import results as R
from trainables import storage


def _pct(x: float) -> str:
    return "n/a" if pd.isna(x) else f"{100 * x:.4f}"


def format_table(table: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """Text lines of a pooled table: per identity a title, then key columns, a / b, rate and
    Wilson 95% interval in percent, the outcome classes (masked, SDC, non-finite) in percent of
    all faults, and the failure rate (non-finite counted as failures) in percent."""
    lines: list[str] = []
    for ident, rows in groups(table):
        shown = pd.DataFrame({k: rows[k].astype(str).to_numpy() for k in keys})
        shown["trials"] = rows["trials"].to_numpy()
        shown["mismatches / correct"] = [f"{a} / {b}" for a, b in zip(rows["mismatches"], rows["golden_correct"])]
        shown["rate %"] = [_pct(r) for r in rows["misclassification_rate"]]
        shown["95% CI %"] = [f"[{_pct(lo)}, {_pct(hi)}]" for lo, hi in zip(rows["ci_low"], rows["ci_high"])]
        shown["masked %"] = [_pct(r) for r in rows["masked_rate"]]
        shown["SDC %"] = [_pct(r) for r in rows["sdc_rate"]]
        shown["non-finite %"] = [_pct(r) for r in rows["nonfinite_rate"]]
        shown["failure %"] = [_pct(r) for r in rows["failure_rate"]]
        lines += ["", group_title(ident, rows), *shown.to_string(index=False).splitlines()]
    return lines


def format_comparison(table: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """Text lines of a comparison: per side 'rate% [low, high]', then the difference to the
    baseline in percentage points and whether the intervals overlap."""
    labels = list(table.attrs.get("sides", {}))
    shown = pd.DataFrame({k: table[k].astype(str).to_numpy() for k in keys})
    for i, label in enumerate(labels):
        rate, lo, hi = (table[f"{c}[{label}]"] for c in ("rate", "ci_low", "ci_high"))
        shown[f"{label} %"] = [f"{_pct(r)} [{_pct(a)}, {_pct(b)}]" for r, a, b in zip(rate, lo, hi)]
        if i:
            shown[f"diff {label} (pp)"] = [("n/a" if pd.isna(d) else f"{100 * d:+.4f}") for d in table[f"diff[{label}]"]]
            shown[f"overlap {label}"] = ["n/a" if pd.isna(o) else ("yes" if o else "NO") for o in table[f"overlap[{label}]"]]
    sides = [f"  {label}{' (baseline)' if i == 0 else ''}: {group_title({k: v for k, v in ident.items() if k != 'campaign'})}"
             + (f", {ident['bit_sampling']} bit" if ident.get("bit_sampling") else "")
             for i, (label, ident) in enumerate(table.attrs.get("sides", {}).items())]
    return [*sides, *shown.to_string(index=False).splitlines()]


def _summary(trials: pd.DataFrame) -> list[str]:
    """One line per campaign: directory, identity, trials, seeds, bit specs, images."""
    lines = []
    for name, rows in trials.groupby("campaign", observed=True, sort=False):
        columns = identity_columns(rows)  # the fault model too, where not all flip
        idents = ", ".join(group_title(dict(zip(columns, map(str, key))))
                           for key in rows[columns].drop_duplicates().itertuples(index=False))
        seeds = ",".join(str(s) for s in sorted(rows["seed"].unique()))
        specs = ",".join(str(s) for s in rows["bit_spec"].astype(str).unique())
        count = int(rows["_trials"].sum()) if "_trials" in rows else len(rows)  # pooled rows (analysis.stream)
        lines.append(f"  {name} ({rows['campaign_dir'].iloc[0]}): {idents}; {count} trials, "
                     f"{int(rows['images'].sum())} faults, seeds {seeds}, bit {specs}")
    return lines


def _fault_model_note(trials: pd.DataFrame) -> list[str]:
    """How per-bit tables count faults of other models than the single-bit flip (nothing when all flip)."""
    if "fault" not in trials or set(trials["fault"].astype(str)) <= {"flip", "nan"}:
        return []
    return ["(Fault models are never pooled. A multi-bit fault (flip:K, burst:K) counts under its first, lowest",
            "bit; random and zero replace every bit and have no bit position, so they are left out of per-bit tables.)"]


def _completeness(paths: Sequence[Path | str]) -> list[str]:
    """'PARTIAL' lines for campaigns with fewer finished, intact trials than planned (or with
    damaged files); nothing for complete campaigns."""
    return _verified(paths)[0]


def _verified(paths: Sequence[Path | str]) -> tuple[list[str], dict[str, set[str]]]:
    """(the PARTIAL lines, {campaign dir: the trial keys the tables may count}) for campaigns
    whose aggregate does not match their verified commits; the tables then cover the trials
    that are both aggregated and finished intact, and the header says how many."""
    lines, keep = [], {}
    for directory in paths:
        spec = R.read_spec(directory)
        planned = spec.get("num_trials")
        check = R.check_trials(directory)
        aggregated = set(storage.read_table(storage.join(directory, R.TRIALS_FILE), columns=["trial_key"])
                         .column("trial_key").to_pylist())
        if not check.damaged and aggregated == set(check.finished) and (planned is None or len(aggregated) >= planned):
            continue
        covered = aggregated & set(check.finished)
        keep[str(directory)] = covered
        state = [f"{len(check.finished)} of {planned if planned is not None else '?'} trials finished"]
        if aggregated != set(check.finished):
            state.append(f"{R.TRIALS_FILE} holds {len(aggregated)}")
        if check.damaged:
            state.append(f"{len(check.damaged)} with missing or damaged files ({', '.join(sorted(check.damaged)[:3])}"
                         f"{', ...' if len(check.damaged) > 3 else ''})")
        lines.append(f"PARTIAL campaign {directory}: {'; '.join(state)}. The tables cover the {len(covered)} finished, "
                     f"intact trial(s) only; `python -m campaign resume {directory}` completes it.")
    return (lines + [""] if lines else []), keep


def _only_verified(frame: pd.DataFrame, keep: dict[str, set[str]]) -> pd.DataFrame:
    """Rows of ``frame`` whose trial is verified (campaigns in ``keep``) or whose campaign is whole."""
    if not keep:
        return frame
    directory, key = frame["campaign_dir"].astype(str), frame["trial_key"].astype(str)
    return frame[[d not in keep or k in keep[d] for d, k in zip(directory, key)]].reset_index(drop=True)


def _comparisons(trials: pd.DataFrame, bits: pd.DataFrame, out: Path, written: list[Path]) -> list[str]:
    """Comparison sections (by type, field, bit, site) with their CSVs; sites only when comparable."""
    lines: list[str] = []
    sections = (("type", trials, ["site_type"]), ("field", bits, ["field"]), ("bit", bits, ["bit"]),
                ("site", trials, ["site_index", "site_type"]))
    for by, frame, keys in sections:
        table = compare(frame, by=by)
        if "sides" not in table.attrs:  # protected campaigns: the protection section shows them paired
            continue
        idents = list(table.attrs["sides"].values())
        lines += ["", f"Comparison by {by} (rate %, Wilson 95% interval; diff to the baseline in percentage points)"]
        if by == "site" and len({(i.get("model"), i.get("kind")) for i in idents}) > 1:
            lines.append("  skipped: the campaigns differ in model or fault kind, so their sites do not correspond")
            continue
        if by == "bit" and len({FORMATS.get(i.get("mode"), (None,))[0] for i in idents}) > 1:
            lines.append("  note: the float formats differ, so a bit number means different things; see 'by field'")
        path = out / f"compare_{by}.csv"
        table.to_csv(path, index=False)
        written.append(path)
        lines += format_comparison(table, keys)
    return lines


def _plots(site_table: pd.DataFrame, site_bits: pd.DataFrame, bit_table: pd.DataFrame, out: Path) -> list[Path]:
    written = [plot_site_rates(site_table, out / "per_site.png")]
    if len(site_bits):
        written.append(plot_site_bit_heatmap(site_bits, out / "site_by_bit.png"))
        written.append(plot_bit_rates(bit_table, out / "per_bit.png"))
    return written


def _language_model_sections(lm_trials, lm_bits, gen_trials, gen_bits, paths, out: Path) -> tuple[list[str], list[Path]]:
    """The teacher-forced and the generation sections (each only where it has trials) and their files."""
    lines: list[str] = []
    written: list[Path] = []
    if not lm_trials.empty:
        lm_lines, lm_files = token_tables.report_lines(lm_trials, lm_bits, paths, out)
        lines += lm_lines
        written += lm_files
    if not gen_trials.empty:
        gen_lines, gen_files = generation_tables.report_lines(gen_trials, gen_bits, out)
        lines += [""] * bool(lines) + gen_lines
        written += gen_files
    return lines, written


def run(dirs: list[str], out_dir: str | None = None) -> str:
    """Build the report of one or more campaigns, write its files into ``out_dir`` (default
    ``<first dir>/report``) and return the text. Several campaigns are reported apart, then compared."""
    paths = campaign_dirs(dirs)
    if out_dir is None and storage.is_uri(paths[0]):
        raise ValueError(f"{paths[0]} is on object storage: pass --out with a local folder for the report")
    if out_dir is not None and (storage.is_uri(out_dir) or storage.uri_problem(str(out_dir))):
        raise ValueError(f"report --out {out_dir}: the report is written to a local folder; name one")
    partial, keep = _verified(paths)
    pooled = stream.pooled(paths, keep)  # one plain campaign: its rows pooled per group batch by batch (bounded memory)
    if pooled is not None:
        trials, bits = pooled.seeds, pooled.bits
        lm_trials, lm_bits, gen_trials, gen_bits = trials.iloc[:0], bits.iloc[:0], trials.iloc[:0], bits.iloc[:0]
    else:
        trials, bits = _only_verified(load(paths), keep), _only_verified(load_bits(paths), keep)
        lm_trials, lm_bits = token_tables.teacher_forced(trials), token_tables.teacher_forced(bits)
        gen_trials, gen_bits = generation_tables.generation(trials), generation_tables.generation(bits)
        trials = trials.drop(index=lm_trials.index.union(gen_trials.index))  # never pooled together
        bits = bits.drop(index=lm_bits.index.union(gen_bits.index))
    if trials.empty and not (lm_trials.empty and gen_trials.empty):
        out = Path(out_dir) if out_dir is not None else paths[0] / "report"
        out.mkdir(parents=True, exist_ok=True)
        lines, written = _language_model_sections(lm_trials, lm_bits, gen_trials, gen_bits, paths, out)
        summary = _summary(pd.concat([f for f in (lm_trials, gen_trials) if not f.empty]))
        lines = ["Bit-flip fault-injection report", "", *partial, "Campaigns:", *summary, "", *lines,
                 "", f"Files written to {out}:", *(f"  {p.name}" for p in written)]
        return "\n".join(lines) + "\n"
    if trials.empty:
        raise ValueError(f"no finished, intact trials to report in {', '.join(map(str, keep))}: "
                         f"run `python -m campaign resume` on it first")
    several = trials["campaign"].nunique() > 1
    out = Path(out_dir) if out_dir is not None else paths[0] / "report"
    out.mkdir(parents=True, exist_ok=True)

    by_site = pooled.sites if pooled else trials
    site_table, type_table = per_site(by_site, several), per_type(by_site, several)
    bit_table, field_table = per_bit(bits, several), per_bit_field(pooled.fields if pooled else bits, several)
    seed_table, site_bits = per_seed(trials, several), site_by_bit(bits, several)
    written: list[Path] = []
    for name, table in (("per_site", site_table), ("per_type", type_table), ("per_bit", bit_table),
                        ("per_bit_field", field_table), ("per_seed", seed_table), ("site_by_bit", site_bits)):
        table.to_csv(out / f"{name}.csv", index=False)
        written.append(out / f"{name}.csv")
    written += write_seed_csv(pooled.layout if pooled else trials, out / "seed_layout.csv")

    mixed = [f"WARNING {line}" for line in golden_warnings(trials)]
    lines = ["Bit-flip fault-injection report", "", *partial, *mixed, *[""] * bool(mixed), "Campaigns:", *_summary(trials), "",
             "Per-site misclassification rate (mismatches / golden-correct images):", "",
             *seed_layer_lines(site_table), "",
             "Outcome classes of every fault: masked (top-1 unchanged, finite logits), SDC (finite logits,",
             "top-1 changed: silent), non-finite (NaN/inf logits: detectable), in % of all faults. 'rate' is",
             "the seed's misclassification rate; 'failure' counts non-finite logits as failures too, over the",
             "same golden-correct images.", "",
             "Per layer type:", *format_table(type_table, ["site_type"]), "",
             "Per bit position (random-bit trials split by the bit actually flipped):",
             *_fault_model_note(trials),
             *format_table(bit_table, ["bit", "field"]), "",
             "Per bit field:", *format_table(field_table, ["field", "bit_range"]), "",
             "Per seed:", *format_table(seed_table, ["seed"])]
    if several:
        lines += _comparisons(trials, bits, out, written)
    protection_text, protection_files = report_protection(trials, out)  # --protect campaigns only
    lines += [""] * bool(protection_text) + protection_text
    written += protection_files
    for path in paths:  # --margin / --allocate campaigns only (their sfi.json)
        lines += sfi_report_lines(path)
    written += _plots(site_table, site_bits, bit_table, out)
    if not (lm_trials.empty and gen_trials.empty):  # campaigns of several kinds: the LM ones in their own sections
        lm_lines, lm_files = _language_model_sections(lm_trials, lm_bits, gen_trials, gen_bits, paths, out)
        lines += ["", *lm_lines]
        written += lm_files
    lines += ["", f"Files written to {out}:", *(f"  {p.name}" for p in written)]
    return "\n".join(lines) + "\n"
