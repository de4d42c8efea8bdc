"""Pooled outcome tables: counts are SUMMED over trials (never rates averaged), then rates and
Wilson 95% intervals are computed from the sums.

Every table groups by the campaign identity (model, dataset, mode, kind) besides its own key,
so different models, data sets, math modes or fault kinds are never merged; campaigns of the
same identity pool unless ``by_campaign=True``. Trial-level tables (per site, type, seed) also
keep random-bit trials apart from fixed-bit trials (column ``bit_sampling``) and pool the fixed
bits they hold (listed in ``bit_specs``); per-bit tables pool both, split by the bit flipped.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import pandas as pd

from analysis.load import CLASS_COUNTS, COUNTS, IDENTITY, OPTIONAL_IDENTITY, Source, bit_spec_order, load, load_bits
from trainables.inject.bitpools import FIELD_NAMES, LAYOUTS, WIDTHS
from trainables.stats import wilson_interval

Data = Union[pd.DataFrame, Source]

SITE_KEYS = ("site_index", "site_name", "site_type")
SAMPLING = "bit_sampling"  # 'random' (one random bit per fault) or 'fixed' (a bit number per trial)
FIELDS = FIELD_NAMES  # sign, exponent, mantissa (IEEE formats); magnitude: the value bits of an integer format
# The element formats' fields (LSB = 0) are bitpools.LAYOUTS, shared with the bit pools that name them.
# Float formats -> (width, exponent bits): IEEE-754 fp32/tf32/fp16/bf16, fp8 weight storage e4m3fn, e5m2.
FORMATS: dict[str, tuple[int, int]] = {name: (WIDTHS[name], fields["exponent"][0] - fields["exponent"][1] + 1)
                                       for name, fields in LAYOUTS.items() if "exponent" in fields}
# Integer formats -> (width, signed). int8 models' weights are qint8, two's complement: bit 7 is the
# sign, 6-0 magnitude. Activations are quint8 codes (value = (code - zero point) x scale): no sign,
# bits 7-0 are magnitude and bit 7 is worth 128 x scale (the x86 backend's reduced range keeps clean
# codes in 0..127, so a flip of bit 7 always adds 128 x scale). int32: qparam zero points.
INT_FORMATS: dict[str, tuple[int, bool]] = {name: (WIDTHS[name], "sign" in fields)
                                            for name, fields in LAYOUTS.items() if "magnitude" in fields}
ELEMENT = "element_format"  # per-bit tables of qparam rows keep float32 scales and int32 zero points apart
WHOLE_ELEMENT_FAULTS = ("random", "zero")  # fault models that replace every bit (left out of per-bit tables)
RATE_COLUMNS = ("misclassification_rate", "ci_low", "ci_high", "sdc_rate", "nonfinite_rate", "masked_rate", "failure_rate")


def _trials(data: Data) -> pd.DataFrame:
    """A trials frame as given, or loaded from campaign directories."""
    return data if isinstance(data, pd.DataFrame) else load(data)


def _bits(data: Data) -> pd.DataFrame:
    """Per-bit rows as given, or loaded from campaign directories; refuses unsplit random-bit trials."""
    frame = data if isinstance(data, pd.DataFrame) else load_bits(data)
    if "bit" not in frame:
        raise ValueError("per-bit tables need a 'bit' column: pass analysis.load_bits(...) rows")
    if (frame["bit"] < 0).any():
        raise ValueError(
            "frame holds random-bit trial rows (bit = -1): per-bit tables need them split by the bit "
            "actually flipped; pass analysis.load_bits(...) rows or the campaign directories"
        )
    if "fault" in frame:  # random and zero replace every bit: they have no bit position
        frame = frame[~frame["fault"].astype(str).isin(WHOLE_ELEMENT_FAULTS)]
    return frame


def identity_columns(frame: pd.DataFrame) -> list[str]:
    """IDENTITY plus each optional identity column (the fault model) that some row of ``frame``
    holds with a value other than its default: different fault models are never pooled."""
    extra = [c for c, default in OPTIONAL_IDENTITY.items()
             if c in frame and (frame[c].astype(object).where(frame[c].notna(), default) != default).any()]
    return [*IDENTITY, *extra]


def _fault_filled(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with missing optional identity values (older rows) set to their default."""
    fill = {c: d for c, d in OPTIONAL_IDENTITY.items() if c in frame and frame[c].isna().any()}
    return frame.assign(**{c: frame[c].astype(object).where(frame[c].notna(), d) for c, d in fill.items()}) if fill else frame


def _require(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {missing}")


def _floats(table: pd.DataFrame, column: str) -> np.ndarray:
    """A count column as float64, NaN where it is missing (absent, or NA in older files)."""
    if column not in table:
        return np.full(len(table), np.nan)
    return pd.to_numeric(table[column], errors="coerce").astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)


def add_rates(table: pd.DataFrame) -> pd.DataFrame:
    """Add misclassification_rate (mismatches / golden_correct, the seed's metric) with its
    Wilson 95% bounds, and the outcome classes over all images: sdc_rate (finite logits, top-1
    changed), nonfinite_rate (NaN/inf logits: detectable), masked_rate (the rest), plus
    failure_rate (golden-correct images with top-1 changed or non-finite logits / golden_correct).
    NaN where a denominator is 0 or a class count is missing."""
    out = table.copy()
    k = out["mismatches"].to_numpy(dtype=np.float64)
    n = out["golden_correct"].to_numpy(dtype=np.float64)
    images = out["images"].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["misclassification_rate"] = np.where(n > 0, k / n, np.nan)
        low, high = wilson_interval(k, n)
        out["ci_low"], out["ci_high"] = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
        sdc, nonfinite = _floats(out, "sdc"), out["nonfinite"].to_numpy(dtype=np.float64)
        masked = images - sdc - nonfinite
        out["masked"] = pd.array(np.where(np.isnan(masked), np.nan, masked), dtype="Float64").astype("Int64")
        out["sdc_rate"] = np.where(images > 0, sdc / images, np.nan)
        out["nonfinite_rate"] = np.where(images > 0, nonfinite / images, np.nan)
        out["masked_rate"] = np.where(images > 0, masked / images, np.nan)
        out["failure_rate"] = np.where(n > 0, _floats(out, "failures") / n, np.nan)
    return out


def _spec_list(specs: pd.Series) -> str:
    """Bit specs of a group as text, e.g. 'random' or '0,1,30'."""
    values = {str(v) for v in specs.dropna().unique()}
    return ",".join(sorted(values, key=bit_spec_order))


def with_sampling(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``bit_sampling`` ('random' or 'fixed', from bit_spec) when the frame has bit_spec."""
    if "bit_spec" not in frame or SAMPLING in frame:
        return frame
    spec = frame["bit_spec"].astype(str)
    pool = spec.str.startswith("random:").to_numpy()  # a bit pool (random:23-30): random among its bits
    sampling = np.where(spec == "random", "random", np.where(pool, "pool", "fixed"))
    return frame.assign(**{SAMPLING: pd.Categorical(sampling, categories=["random", "fixed", *(["pool"] if pool.any() else [])])})


def pool(frame: pd.DataFrame, keys: Sequence[str], by_campaign: bool = False, split_sampling: bool = False) -> pd.DataFrame:
    """Sum the counts of ``frame`` per identity (+ campaign, + bit_sampling) + ``keys``; add rates.

    Columns: [campaign], model, dataset, mode, kind, [bit_sampling], keys..., [bit_specs], trials,
    counts, rates; ``trials`` counts distinct trial keys.
    """
    if split_sampling:
        frame = with_sampling(frame)
    sampling = [SAMPLING] if split_sampling and SAMPLING in frame else []
    frame = _fault_filled(frame)
    identity = identity_columns(frame)
    group = (["campaign"] if by_campaign else []) + identity + sampling + [k for k in keys if k not in identity]
    _require(frame, [*group, *COUNTS])
    if "_trials" in frame:  # rows pooled already (analysis.stream): their trial counts add up
        work = frame
    elif "trial_key" not in frame:
        work = frame.assign(_trial=np.arange(len(frame)))  # no keys: count rows as trials
    elif "campaign" in frame:
        work = frame.assign(_trial=frame["campaign"].astype(str) + "/" + frame["trial_key"].astype(str))
    else:
        work = frame.assign(_trial=frame["trial_key"])
    grouped = work.groupby(group, observed=True, sort=True, dropna=False)
    table = grouped[list(COUNTS)].sum()
    for column in CLASS_COUNTS:  # summed where every pooled row has it, else NA
        if column in work:
            values = pd.to_numeric(work[column], errors="coerce").astype("Int64")
            by = work.assign(**{column: values}).groupby(group, observed=True, sort=True, dropna=False)[column]
            table[column] = by.sum().where(by.count() == by.size()).astype("Int64")
    table.insert(0, "trials", grouped["_trials"].sum() if "_trials" in work else grouped["_trial"].nunique())
    if "bit_spec" in work:
        table.insert(0, "bit_specs", grouped["bit_spec"].agg(_spec_list))
    table = table.reset_index()
    for column in COUNTS + ("trials",):
        table[column] = table[column].astype("int64")
    return add_rates(table)


def per_site(data: Data, by_campaign: bool = False) -> pd.DataFrame:
    """Per-site table (the seed's per-layer table): one row per identity x site."""
    return pool(_trials(data), SITE_KEYS, by_campaign, split_sampling=True)


def per_type(data: Data, by_campaign: bool = False) -> pd.DataFrame:
    """Per-layer-type table (site_type, e.g. Conv2d, ReLU), pooling all sites of a type."""
    return pool(_trials(data), ("site_type",), by_campaign, split_sampling=True)


def per_seed(data: Data, by_campaign: bool = False) -> pd.DataFrame:
    """Per-seed table, pooling all sites: shows the seed-to-seed spread."""
    return pool(_trials(data), ("seed",), by_campaign, split_sampling=True)


def element_format(mode: str, kind: str, weight_format: object = None, site_name: object = None) -> str:
    """The storage format of the elements a row's faults hit: an fp8 weight format for weight
    faults under fp8 storage; int8 (qint8 weights) or uint8 (quint8 activations) in mode int8;
    for qparam sites int32 (zero points, by their site name) or fp32 (scales); else the mode."""
    if kind == "weight" and isinstance(weight_format, str) and weight_format not in ("", "none"):
        return weight_format
    if kind == "qparam":  # '<module>.zero_point', '<module>.weight_zero_point', '<op>_zero_point_<n>': int32 words
        return "int32" if isinstance(site_name, str) and re.search(r"zero_point(_\d+)?$", site_name) else "fp32"
    if mode == "int8":
        return "int8" if kind == "weight" else "uint8"
    return mode


def bit_field(mode: str, bit: int) -> str:
    """'sign', 'exponent' or 'mantissa' of bit ``bit`` (LSB = 0) in the storage format ``mode``
    (a math mode or an element format: fp8_e4m3fn, fp8_e5m2, int8, uint8 -> 'sign'/'magnitude')."""
    if mode not in LAYOUTS:
        raise ValueError(f"unknown math mode {mode!r}: expected one of {sorted(FORMATS)}")
    if not 0 <= bit < WIDTHS[mode]:
        raise ValueError(f"bit {bit} out of range for {'format' if mode in INT_FORMATS else 'mode'} {mode!r} "
                         f"({WIDTHS[mode]} bits)")
    return next(field for field, (high, low) in LAYOUTS[mode].items() if low <= bit <= high)


def field_bits(mode: str, field: str) -> tuple[int, int]:
    """(highest, lowest) bit of a field in the storage format of ``mode``."""
    return LAYOUTS[mode][field]


def row_formats(frame: pd.DataFrame) -> list[str]:
    """Each row's element format (its element_format column, or element_format of its mode,
    kind, weight_format and site_name)."""
    if ELEMENT in frame:
        return frame[ELEMENT].astype(str).tolist()
    kinds = frame["kind"].astype(str) if "kind" in frame else [""] * len(frame)
    weights = frame["weight_format"].astype(object) if "weight_format" in frame else [None] * len(frame)
    names = frame["site_name"].astype(object) if "site_name" in frame else [None] * len(frame)
    return [element_format(m, k, w, s) for m, k, w, s in zip(frame["mode"].astype(str), kinds, weights, names)]


def _split_elements(frame: pd.DataFrame) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """``frame`` plus the pooling key that keeps qparam scales (fp32) and zero points (int32)
    apart, when it holds qparam rows; else as given, with no key (today's tables)."""
    if "kind" not in frame or "mode" not in frame or not (frame["kind"].astype(str) == "qparam").any():
        return frame, ()
    return frame.assign(**{ELEMENT: row_formats(frame)}), (ELEMENT,)


def _with_field(frame: pd.DataFrame) -> pd.DataFrame:
    """Add a categorical 'field' column (sign/exponent/mantissa/magnitude) from the element format and bit."""
    _require(frame, ["mode", "bit"])
    formats = row_formats(frame)
    lookup = {(f, int(b)): bit_field(f, int(b)) for f, b in set(zip(formats, frame["bit"]))}
    fields = [lookup[(f, int(b))] for f, b in zip(formats, frame["bit"])]
    return frame.assign(field=pd.Categorical(fields, categories=list(FIELDS), ordered=True))


def per_bit(data: Data, by_campaign: bool = False) -> pd.DataFrame:
    """Per-bit-position table from per-bit rows (random-bit trials split by the bit flipped)."""
    frame, element = _split_elements(_bits(data))
    table = pool(frame, (*element, "bit"), by_campaign)
    return _with_field(table) if len(table) else table.assign(field=pd.Categorical([], categories=list(FIELDS)))


def per_bit_field(data: Data, by_campaign: bool = False) -> pd.DataFrame:
    """Sign / exponent / mantissa table, the field widths following each row's mode.

    ``bit_range`` is 'high-low' (LSB = 0) and ``width`` the field's number of bits.
    """
    frame, element = _split_elements(_bits(data))
    table = pool(_with_field(frame), (*element, "field"), by_campaign)
    ranges = [field_bits(e, str(f)) for e, f in zip(row_formats(table), table["field"])]
    table.insert(table.columns.get_loc("field") + 1, "bit_range", [f"{h}" if h == l else f"{h}-{l}" for h, l in ranges])
    table.insert(table.columns.get_loc("bit_range") + 1, "width", [h - l + 1 for h, l in ranges])
    return table


def site_by_bit(data: Data, by_campaign: bool = False) -> pd.DataFrame:
    """Site x bit table (long form, one row per identity x site x bit) from per-bit rows."""
    return pool(_bits(data), (*SITE_KEYS, "bit"), by_campaign)


def group_columns(table: pd.DataFrame) -> list[str]:
    """The identity columns of a table (campaign, bit_sampling and a qparam table's element_format
    when present), to split it per group."""
    return [c for c in ("campaign", *IDENTITY, *OPTIONAL_IDENTITY, SAMPLING, ELEMENT) if c in table.columns]


def groups(table: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """Split a table into (identity dict, rows) per campaign identity, in table order."""
    columns = group_columns(table)
    if not columns:
        return [({}, table)]
    out = []
    for key, rows in table.groupby(columns, observed=True, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        out.append(({c: (None if pd.isna(v) else str(v)) for c, v in zip(columns, key)}, rows))
    return out


def group_title(ident: dict, rows: pd.DataFrame | None = None) -> str:
    """'model / dataset / mode / kind faults', '[campaign] ' first when present, ' (bit: ...)'
    after when ``rows`` list their bit specs."""
    parts = [ident.get(c) or "?" for c in ("model", "dataset", "mode")]
    fault = ident.get("fault")
    model = f" {fault}" if fault else ""  # present where the table holds several fault models
    text = " / ".join(parts) + f" / {ident.get('kind') or '?'}{model} faults"
    text = f"[{ident['campaign']}] {text}" if ident.get("campaign") else text
    notes = []
    if ident.get(ELEMENT):  # qparam sites: float32 scales, int32 zero points
        notes.append({"fp32": "float32 scales", "int32": "int32 zero points"}.get(ident[ELEMENT], ident[ELEMENT]))
    if ident.get("golden") not in (None, "consistent"):  # a campaign whose machines disagree: see golden_warnings
        notes.append(f"golden outputs {ident['golden']}")
    if fault in WHOLE_ELEMENT_FAULTS:
        notes.append("every bit of the element")
    elif rows is not None and "bit_specs" in rows:
        specs = {s for v in rows["bit_specs"].dropna() for s in str(v).split(",")}
        notes += [f"bit: {','.join(sorted(specs, key=bit_spec_order))}"] if specs else []
    if model and rows is not None and "bit" in rows and str(fault).startswith(("flip:", "burst:")):
        notes.append("per-bit rows count each fault under its lowest bit")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def seed_layer_lines(site_table: pd.DataFrame) -> list[str]:
    """The seed's per-layer text: per identity a header line, then one line per site exactly
    ``Layer #{k}: {a} / {b} = {r:.4f}%, {Type}`` (param sites: ``Param #{k}: ..., {Owner type} {name}``;
    a proportional campaign's site pool: ``All sites: ..., proportional (N kind sites)``);
    a blank line between groups."""
    _require(site_table, [*SITE_KEYS, "mismatches", "golden_correct"])
    lines: list[str] = []
    for ident, rows in groups(site_table):
        if lines:
            lines.append("")
        lines.append(group_title(ident, rows))
        for row in rows.sort_values("site_index").itertuples(index=False):
            a, b = int(row.mismatches), int(row.golden_correct)
            r = 100.0 * a / b if b else float("nan")
            if int(row.site_index) == -1:  # a proportional campaign's trials: every fault picks its site by size
                lines.append(f"All sites: {a} / {b} = {r:.4f}%, {row.site_name}")
            elif str(getattr(row, "kind", "")) in ("param", "qparam"):  # qparam: an int8 model's scales and zero points
                label = "QParam" if str(row.kind) == "qparam" else "Param"
                lines.append(f"{label} #{int(row.site_index)}: {a} / {b} = {r:.4f}%, {row.site_type} {row.site_name}")
            else:
                lines.append(f"Layer #{int(row.site_index)}: {a} / {b} = {r:.4f}%, {row.site_type}")
    return lines


def _seed_csv_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of one identity -> one row per site, one 'seed_<N>' column per seed (a fraction)."""
    table = pool(rows, (*SITE_KEYS, "seed"))
    table = table.astype({k: object for k in SITE_KEYS})  # plain index levels: no category products
    wide = table.set_index([*SITE_KEYS, "seed"])["misclassification_rate"].unstack("seed")
    wide = wide.reindex(columns=sorted(wide.columns)).sort_index(level="site_index", sort_remaining=False)
    wide.columns = [f"seed_{int(s)}" for s in wide.columns]
    wide = wide.reset_index()
    name = [f"Layer #{int(k)} {t}" for k, t in zip(wide["site_index"], wide["site_type"])]
    wide.insert(0, "name", name)
    return wide


def write_seed_csv(trials: Data, path: Union[str, Path]) -> list[Path]:
    """Write the seed-layout CSV: columns name ('Layer #{k} {Type}'), site_index, site_name,
    site_type, then seed_<N> per seed (ascending) holding that seed's misclassification rate as
    a fraction (empty when the seed lacks that site). One file per identity and bit sampling:
    ``path`` itself when there is one, else ``<stem>_<values that differ, e.g. kind><suffix>``."""
    frame = with_sampling(_trials(trials))
    _require(frame, [*IDENTITY, *SITE_KEYS, "seed", *COUNTS])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for ident, rows, target in split_paths(frame, path):
        _seed_csv_frame(rows).to_csv(target, index=False)
        written.append(target)
    return written


def split_paths(frame: pd.DataFrame, path: Path) -> list[tuple[dict, pd.DataFrame, Path]]:
    """Split a frame per identity and name a file for each: ``path`` when there is one group,
    else ``<stem>_<differing identity values joined by '_'><suffix>``."""
    parts = groups(frame[[c for c in frame.columns if c != "campaign"]]) if "campaign" in frame else groups(frame)
    if len(parts) == 1:
        return [(parts[0][0], parts[0][1], path)]
    varying = [c for c in (*IDENTITY, *OPTIONAL_IDENTITY, SAMPLING) if len({ident.get(c) for ident, _ in parts}) > 1]
    out = []
    for ident, rows in parts:
        suffix = "_".join(_safe(ident.get(c) or "none") for c in varying)
        out.append((ident, rows, path.with_name(f"{path.stem}_{suffix}{path.suffix}")))
    return out


def _safe(text: str) -> str:
    """A file-name-safe version of an identity value."""
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in text)
