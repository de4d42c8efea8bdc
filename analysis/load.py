"""Read campaign directories (trials.parquet, bits.parquet, faults/) into pandas frames.

Torch-free and Ray-free: only pandas, pyarrow and the on-disk format of ``trainables.results``.
Frames from several campaigns are concatenated with one set of dtypes (see ``TRIAL_DTYPES``):
low-cardinality strings become categoricals, counts int64, optional integers nullable Int64.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import pandas as pd
import pyarrow as pa

from trainables import results as R
from trainables import storage

PathLike = Union[str, "os.PathLike[str]"]
Source = Union[PathLike, Sequence[PathLike]]

IDENTITY = ("model", "dataset", "mode", "kind")
# Identity columns with a default: tables group by one only where a row differs from its default, so
# today's tables keep their columns; files written before the column existed read as the default.
OPTIONAL_IDENTITY = {"fault": "flip", "weight_format": "none", "protect": "none",  # fp8 weight storage; mitigation
                     "golden": "consistent",  # see golden_groups: never pool trials whose fault-free outputs differ
                     "trial_kind": "classification"}  # causal LMs: teacher-forced (analysis.tokens); never pooled
COUNTS = ("images", "golden_correct", "mismatches", "changed", "nonfinite")
# Outcome-class counts (sdc: finite logits, top-1 changed; failures: golden-correct images whose
# top-1 changed or whose logits are non-finite); NA in files written before they existed.
CLASS_COUNTS = ("sdc", "failures")
CATEGORICAL = ("campaign", "model", "dataset", "mode", "kind", "site_type", "bit_spec", "device")

# Columns analysis cannot do without, per file.
REQUIRED_TRIAL_COLUMNS = (
    "campaign", "trial_key", "model", "dataset", "mode", "kind", "site_index", "site_name",
    "site_type", "bit_spec", "bit", "seed", *COUNTS,
)
REQUIRED_BIT_COLUMNS = ("trial_key", "bit", *COUNTS)
REQUIRED_FAULT_COLUMNS = ("trial_key", "image", "golden_correct", "changed", "bit")

# Trial columns joined onto per-bit and per-fault rows.
TRIAL_KEYS_FOR_ROWS = (
    "campaign", "campaign_dir", "model", "dataset", "mode", "kind", "site_index", "site_name",
    "site_type", "seed", "bit_spec", "fault", "weight_format", "golden", "trial_kind",
)

_STR = pd.StringDtype(na_value=np.nan)
TRIAL_DTYPES: dict[str, object] = {
    "campaign": "category", "campaign_dir": _STR, "trial_key": _STR, "model": "category",
    "dataset": "category", "synthetic": "boolean", "mode": "category", "kind": "category",
    "site_index": "int64", "site_name": _STR, "site_call": "Int64", "site_type": "category",
    "bit_spec": "category", "bit": "int64", "seed": "int64", "images_per_weight_fault": "Int64",
    "batch_size": "Int64", **{c: "int64" for c in COUNTS}, **{c: "Int64" for c in CLASS_COUNTS}, "masked": "Int64",
    "misclassification_rate": "float64", "sdc_rate": "float64", "nonfinite_rate": "float64", "masked_rate": "float64",
    "failure_rate": "float64", "ci_low": "float64", "ci_high": "float64",
    "stopped_early": "boolean", "wall_s": "float64", "device": "category", "hardware": "category",
    "torch_version": "category", "golden_digest": _STR, "golden": "category",
}
_ARROW_TO_PANDAS = ((pa.types.is_string, _STR), (pa.types.is_integer, "Int64"), (pa.types.is_floating, "float64"),
                    (pa.types.is_boolean, "boolean"))


def _schema_dtypes(schema: pa.Schema, known: dict[str, object]) -> dict[str, object]:
    """``known`` plus a nullable pandas dtype for every other column of ``schema`` (columns the
    writer added later; older files lack them and get NA)."""
    extra = {}
    for field in schema:
        if field.name not in known:
            extra[field.name] = next((d for test, d in _ARROW_TO_PANDAS if test(field.type)), object)
    return {**known, **extra}


TRIAL_DTYPES = _schema_dtypes(R.TRIAL_SCHEMA, TRIAL_DTYPES)
BIT_DTYPES: dict[str, object] = {
    **{c: TRIAL_DTYPES[c] for c in TRIAL_KEYS_FOR_ROWS}, "trial_key": _STR, "bit": "int64",
    **{c: "int64" for c in COUNTS}, **{c: "Int64" for c in CLASS_COUNTS},
}
FAULT_DTYPES: dict[str, object] = {
    **{c: TRIAL_DTYPES[c] for c in TRIAL_KEYS_FOR_ROWS}, "trial_key": _STR, "image": "int64",
    "label": "Int64", "golden": "Int64", "faulty": "Int64", "golden_correct": "boolean",
    "changed": "boolean", "nonfinite": "boolean", "outcome": "category", "position": "Int64", "fault_group": "Int64",
    "bit": "int64", "raw_before": "Int64", "value_before": "float64", "value_after": "float64",
}
BIT_DTYPES = _schema_dtypes(R.BIT_SCHEMA, BIT_DTYPES)
FAULT_DTYPES = _schema_dtypes(R.FAULT_SCHEMA, FAULT_DTYPES)
_NON_NULL = {"site_index", "bit", "seed", "image", *COUNTS}


def campaign_dirs(source: Source) -> list[Path | str]:
    """One location or a sequence of them -> distinct campaign directories, in the order
    given: local paths as Paths, object-store URIs (s3://bucket/prefix) as strings."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise ValueError("no campaign directory given")
    seen: dict[Path | str, Path | str] = {}
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"expected a campaign directory path, got {type(item).__name__}")
        path = storage.location(item) if storage.is_uri(item) else Path(item)
        seen.setdefault(storage.location(item), path)
    return list(seen.values())


def _check_version(path: Path | str, schema: pa.Schema) -> None:
    """Refuse a parquet file without our schema version or with a newer one than we read."""
    raw = (schema.metadata or {}).get(R.VERSION_KEY)
    if raw is None:
        raise ValueError(f"{path} has no {R.VERSION_KEY.decode()} metadata: not written by this project")
    try:
        version = int(raw.decode())
    except ValueError:
        raise ValueError(f"{path}: unreadable schema version {raw!r}") from None
    if version > R.SCHEMA_VERSION:
        raise ValueError(
            f"{path} has schema version {version}, newer than the supported {R.SCHEMA_VERSION}: "
            "update this checkout to read it"
        )
    if version < 1:
        raise ValueError(f"{path}: unsupported schema version {version}")


def _check_spec(directory: Path | str) -> dict:
    """Read spec.json, refusing a missing directory/spec or a newer schema version."""
    if not storage.is_dir(directory):
        why = "it is a file" if storage.exists(directory) else "it does not exist"
        raise ValueError(f"{directory} is not a campaign directory: {why}")
    if not storage.is_file(storage.join(directory, R.SPEC_FILE)):
        hint = " (it has trials.parquet but no spec.json)" if storage.exists(storage.join(directory, R.TRIALS_FILE)) else ""
        raise ValueError(f"{directory} is not a campaign directory: no {R.SPEC_FILE}{hint}")
    spec = R.read_spec(directory)
    version = spec.get("schema_version")
    if isinstance(version, int) and version > R.SCHEMA_VERSION:
        raise ValueError(
            f"{storage.join(directory, R.SPEC_FILE)} has schema version {version}, newer than the supported "
            f"{R.SCHEMA_VERSION}: update this checkout to read it"
        )
    return spec


def _read_aggregate(directory: Path | str, file_name: str, required: Iterable[str]) -> pa.Table:
    """Read trials.parquet or bits.parquet of a campaign, with clear errors for partial campaigns."""
    path = storage.join(directory, file_name)
    if not storage.is_file(path):
        parts = R.finished_keys(directory)
        state = f"{len(parts)} finished trial part(s) but no {file_name}" if parts else f"no {file_name} yet"
        raise ValueError(f"campaign {directory} has {state}: run `python -m campaign resume {directory}` to aggregate it")
    try:
        schema = storage.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path} is not a readable parquet file: {exc}") from None
    _check_version(path, schema)
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise ValueError(f"{path} lacks required column(s) {missing}")
    return storage.read_table(path)


def _campaign_name(frame: pd.DataFrame, spec: dict, directory: Path | str) -> pd.Series:
    """The trial rows' campaign name, filled from spec.json's name or the directory name."""
    fallback = str(spec.get("name") or storage.name(storage.location(directory)))
    names = frame["campaign"].astype(_STR)
    return names.where(names.notna() & (names != ""), fallback)


def _unique_names(frames: list[pd.DataFrame]) -> None:
    """Rename campaigns so two directories never share a name: later ones get ' [2]', ' [3]'."""
    used: set[str] = set()
    for frame in frames:
        mapping = {}
        for name in frame["campaign"].dropna().unique():
            new, n = str(name), 1
            while new in used:
                n += 1
                new = f"{name} [{n}]"
            mapping[name] = new
        used.update(mapping.values())
        frame["campaign"] = frame["campaign"].map(mapping)


def bit_spec_order(spec: object) -> tuple:
    """Sort key of bit specs: 'random' first, then bit numbers ascending."""
    text = str(spec)
    return (0, 0, "") if text == "random" else (1, int(text), "") if text.lstrip("-").isdigit() else (2, 0, text)


def _category_order(column: str, values: Iterable) -> list:
    """Category order: campaigns as given, bit specs numerically with 'random' first, the rest sorted."""
    values = [v for v in pd.unique(pd.Series(list(values), dtype=object)) if not pd.isna(v)]
    if column == "campaign":
        return values
    if column == "bit_spec":
        return sorted(values, key=bit_spec_order)
    return sorted(values, key=str)


def normalize(frame: pd.DataFrame, dtypes: dict[str, object]) -> pd.DataFrame:
    """Cast to the fixed dtypes (known columns first, in order; extras kept after), so frames
    of several campaigns concatenate cleanly."""
    out = {}
    for column, dtype in dtypes.items():
        values = frame[column] if column in frame else pd.Series(pd.NA, index=frame.index, dtype=object)
        if column in _NON_NULL and values.isna().any():
            raise ValueError(f"column {column!r} has missing values")
        if dtype == "category":
            values = values.astype(_STR)
            out[column] = pd.Categorical(values, categories=_category_order(column, values))
        elif dtype == "boolean":
            out[column] = values.astype(object).where(values.notna(), None).astype("boolean")
        elif dtype in ("Int64", "float64"):
            out[column] = pd.to_numeric(values, errors="coerce").astype(dtype)
        else:
            out[column] = values.astype(dtype)
    extras = [c for c in frame.columns if c not in dtypes]
    result = pd.DataFrame(out, index=frame.index)
    for column in extras:
        result[column] = frame[column]
    return result.reset_index(drop=True)


def _concat(frames: list[pd.DataFrame], dtypes: dict[str, object]) -> pd.DataFrame:
    """Concatenate frames holding plain strings, then apply the fixed dtypes."""
    frames = [f for f in frames if len(f.columns)]
    joined = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(dtypes))
    return normalize(joined, dtypes)


def _trials_one(directory: Path | str) -> pd.DataFrame:
    """Trial rows of one campaign with strings as plain str (categoricals come after concat)."""
    spec = _check_spec(directory)
    table = _read_aggregate(directory, R.TRIALS_FILE, REQUIRED_TRIAL_COLUMNS)
    if table.num_rows == 0:
        raise ValueError(f"campaign {directory} has no trials: nothing to analyse")
    frame = table.to_pandas()
    frame["campaign"] = _campaign_name(frame, spec, directory)
    frame["campaign_dir"] = str(directory)
    frame["golden"] = golden_groups(frame)
    for column, default in OPTIONAL_IDENTITY.items():
        frame[column] = frame[column].fillna(default) if column in frame else default
    return frame


def golden_groups(trials: pd.DataFrame) -> pd.Series:
    """Per trial row of one campaign: 'consistent' while all its trials agree on the golden
    (fault-free) logits and predictions (or predate the digest), else the trial's golden digest,
    so that tables never pool trials of machines that compute differently."""
    digests = trials["golden_digest"] if "golden_digest" in trials else pd.Series(pd.NA, index=trials.index)
    if digests.dropna().nunique() <= 1:
        return pd.Series("consistent", index=trials.index, dtype=object)
    return digests.astype(object).where(digests.notna(), "unrecorded")


def golden_warnings(trials: pd.DataFrame) -> list[str]:
    """One line per campaign whose trials disagree on the golden outputs, naming each group
    (digest, trials, the hardware it ran on); empty when every campaign is consistent."""
    lines = []
    split = trials[trials["golden"].astype(str) != "consistent"] if "golden" in trials else trials.iloc[:0]
    for name, rows in split.groupby("campaign", observed=True, sort=True):
        parts = []
        for digest, group in rows.groupby(rows["golden"].astype(str), sort=True):
            where = sorted(str(h) for h in group["hardware"].dropna().unique()) if "hardware" in group else []
            parts.append(f"golden {digest} on {group['trial_key'].nunique()} trial(s)"
                         + (f" ({', '.join(where)})" if where else ""))
        lines.append(f"campaign {name}: its trials disagree on the fault-free (golden) outputs, so they ran on "
                     f"hardware that computes differently: {'; '.join(parts)}. The tables keep these groups apart "
                     f"(column golden); rerun on one kind of machine to pool them")
    return lines


def _load_trial_frames(source: Source) -> list[pd.DataFrame]:
    frames = [_trials_one(d) for d in campaign_dirs(source)]
    _unique_names(frames)
    return frames


def load(source: Source) -> pd.DataFrame:
    """Trial rows of one or several campaign directories, one frame with stable dtypes.

    Adds ``campaign_dir``; two directories with the same campaign name get distinct names.
    """
    return _concat(_load_trial_frames(source), TRIAL_DTYPES)


def _join_trials(rows: pd.DataFrame, trials: pd.DataFrame, what: str, directory: Path | str) -> pd.DataFrame:
    """Attach the trial identity columns to per-bit or per-fault rows (inner join on trial_key)."""
    keys = trials[list(TRIAL_KEYS_FOR_ROWS) + ["trial_key"]]
    drop = [c for c in TRIAL_KEYS_FOR_ROWS if c in rows.columns]
    joined = rows.drop(columns=drop).merge(keys, on="trial_key", how="inner", validate="many_to_one")
    if len(joined) < len(rows) and what == "bits":
        orphans = sorted(set(rows["trial_key"]) - set(trials["trial_key"]))[:3]
        raise ValueError(
            f"{storage.join(directory, R.BITS_FILE)} has rows of trials not in {R.TRIALS_FILE} (e.g. {orphans}): "
            f"run `python -m campaign resume {directory}` to re-aggregate"
        )
    return joined


def _directory_of(trials: pd.DataFrame) -> Path | str:
    """The campaign directory of one campaign's trial rows (a Path, or a URI string)."""
    directory = str(trials["campaign_dir"].iloc[0])
    return directory if storage.is_uri(directory) else Path(directory)


def load_bits(source: Source) -> pd.DataFrame:
    """Per-(trial, bit) counts joined with their trial's identity columns.

    For random-bit trials these split the trial's faults by the bit actually flipped; rows
    with no faults are dropped. Per-bit analysis must use these rows, not the trial rows.
    """
    frames = []
    for trials in _load_trial_frames(source):
        directory = _directory_of(trials)
        bits = _read_aggregate(directory, R.BITS_FILE, REQUIRED_BIT_COLUMNS).to_pandas()
        bits = bits[bits["images"] > 0]
        frames.append(_join_trials(bits, trials, "bits", directory))
    return _concat(frames, BIT_DTYPES)


def load_faults(source: Source) -> pd.DataFrame:
    """Per-fault rows (faults/*.parquet) of the aggregated trials, joined with their trial's
    identity columns; an empty frame with the same columns when no faults were recorded."""
    frames = []
    for trials in _load_trial_frames(source):
        directory = _directory_of(trials)
        wanted = set(trials["trial_key"])
        tables = []
        for file_name in storage.list_names(storage.join(directory, R.FAULTS_DIR), ".parquet"):
            if file_name[: -len(".parquet")] not in wanted:
                continue  # a trial not aggregated (yet): skip its faults like its counts
            path = storage.join(directory, R.FAULTS_DIR, file_name)
            table = storage.read_table(path)
            _check_version(path, table.schema)
            missing = [c for c in REQUIRED_FAULT_COLUMNS if c not in table.column_names]
            if missing:
                raise ValueError(f"{path} lacks required column(s) {missing}")
            tables.append(table.replace_schema_metadata(None))
        if tables:
            rows = pa.concat_tables(tables, promote_options="default").to_pandas()
            frames.append(_join_trials(rows, trials, "faults", directory))
    return _concat(frames, FAULT_DTYPES)
