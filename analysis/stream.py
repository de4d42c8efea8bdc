"""The report's tables in bounded memory: trials.parquet and bits.parquet are read a batch of rows
at a time, only the columns the tables need, and each batch's counts are summed per group. The
result is a few small frames with one row per group and a ``_trials`` column holding each group's
trial count. The functions of analysis.tables pool these rows as they pool whole frames
(analysis.tables.pool), so the tables are the same.

The per-bit rows take their trial's identity through a sorted index of the trial keys (about 50
bytes per trial); everything else follows the number of groups. The largest frame is the one the
seed-layout CSV needs: one row per site x seed x bit spec.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from analysis.load import (
    BIT_DTYPES,
    CLASS_COUNTS,
    COUNTS,
    IDENTITY,
    OPTIONAL_IDENTITY,
    REQUIRED_BIT_COLUMNS,
    REQUIRED_TRIAL_COLUMNS,
    TRIAL_DTYPES,
    TRIAL_KEYS_FOR_ROWS,
    _STR,
    _campaign_name,
    _category_order,
    _check_spec,
    _check_version,
)
from trainables import results as R
from trainables import storage

BATCH_ROWS = 65_536  # rows read at a time (one row group of the aggregated files)
SITE_KEYS = ("site_index", "site_name", "site_type")
ELEMENT = "element_format"  # as analysis.tables.ELEMENT
WHOLE_ELEMENT_FAULTS = ("random", "zero")  # as analysis.tables: no bit position, left out of per-bit tables
# A trial's identity as its per-bit rows carry it (load.TRIAL_KEYS_FOR_ROWS; per-bit tables never group by seed)
PROFILE = tuple(c for c in TRIAL_KEYS_FOR_ROWS if c != "seed")
TRIAL_GROUP = ("campaign", "campaign_dir", *IDENTITY, *OPTIONAL_IDENTITY, "bit_spec", *SITE_KEYS, "seed")
BIT_GROUP = (*PROFILE, ELEMENT, "bit")
FIELD_GROUP = (*(c for c in PROFILE if c not in SITE_KEYS), ELEMENT, "field")


@dataclass(frozen=True)
class Pooled:
    """A campaign's rows pooled per group: ``trials`` (for the per-site, per-type and per-seed tables
    and the seed-layout CSV), ``bits`` (per bit and site x bit) and ``fields`` (per bit field)."""

    trials: pd.DataFrame
    bits: pd.DataFrame
    fields: pd.DataFrame


class _Sums:
    """Counts summed per group over batches (``_trials``: the group's trials), in the order groups first
    appear; class counts stay NA for a group where any row lacks them. ``lowest``: kept as a minimum."""

    def __init__(self, keys: tuple[str, ...], lowest: tuple[str, ...] = ()) -> None:
        self.keys, self.lowest = list(keys), list(lowest)
        self.done: pd.DataFrame | None = None
        self.parts: list[pd.DataFrame] = []
        self.waiting = 0

    def add(self, frame: pd.DataFrame, trials: np.ndarray) -> None:
        work = frame[self.keys].astype(object).where(frame[self.keys].notna(), None)
        for column in (*COUNTS, *self.lowest):
            work[column] = frame[column].to_numpy(dtype=np.int64)
        for column in CLASS_COUNTS:
            values = pd.to_numeric(frame[column], errors="coerce") if column in frame else pd.Series(np.nan, frame.index)
            work[column] = values.fillna(0).to_numpy(dtype=np.int64)
            work[f"_has_{column}"] = values.notna().to_numpy(dtype=np.int64)
        work["_trials"], work["_rows"] = trials.astype(np.int64), 1
        self.parts.append(self._combine(work))
        self.waiting += len(self.parts[-1])
        if self.waiting > max(BATCH_ROWS, 0 if self.done is None else len(self.done)):  # amortized: each row combined O(log) times
            self._flush()

    def _combine(self, frame: pd.DataFrame) -> pd.DataFrame:
        grouped = frame.groupby(self.keys, sort=False, dropna=False)
        rules = {c: ("min" if c in self.lowest else "sum") for c in frame.columns if c not in self.keys}
        return grouped.agg(rules).reset_index()

    def _flush(self) -> None:
        frames = ([self.done] if self.done is not None else []) + self.parts
        if frames:
            self.done = self._combine(pd.concat(frames, ignore_index=True))
        self.parts, self.waiting = [], 0

    def frame(self) -> pd.DataFrame | None:
        self._flush()
        if self.done is None:
            return None
        out = self.done
        for column in CLASS_COUNTS:
            out[column] = out[column].astype("Int64").where(out[f"_has_{column}"] == out["_rows"], pd.NA)
        return out.drop(columns=[f"_has_{c}" for c in CLASS_COUNTS] + ["_rows"])


class _Seen:
    """The distinct values of the categorical columns, in the order they appear (their categories)."""

    def __init__(self, columns) -> None:
        self.values = {c: {} for c in columns}

    def add(self, frame: pd.DataFrame) -> None:
        for column, seen in self.values.items():
            if column in frame:
                seen.update(dict.fromkeys(pd.unique(frame[column].astype(object))))

    def cast(self, frame: pd.DataFrame, dtypes: dict) -> pd.DataFrame:
        """``frame`` with the dtypes load() gives these columns (categories from every row seen)."""
        out = frame.copy()
        for column in frame.columns:
            dtype = dtypes.get(column)
            if column in self.values and dtype == "category":
                out[column] = pd.Categorical(frame[column].astype(_STR),
                                             categories=_category_order(column, list(self.values[column])))
            elif dtype in ("Int64", "float64", "boolean"):
                continue
            elif dtype is not None:
                out[column] = frame[column].astype(dtype)
        return out


def _open(directory, file_name: str, required) -> pq.ParquetFile | None:
    """The aggregated file as a ParquetFile (checked as load checks it), or None when load must say why."""
    path = storage.join(directory, file_name)
    if not storage.is_file(path):
        return None
    fs, inner = storage.resolve(path)
    handle = pq.ParquetFile(fs.open_input_file(inner))
    schema = handle.schema_arrow
    _check_version(path, schema)
    if any(c not in schema.names for c in required):
        return None
    return handle


def _batches(handle: pq.ParquetFile, columns, batch_rows: int):
    names = [c for c in columns if c in handle.schema_arrow.names]
    for batch in handle.iter_batches(batch_size=batch_rows, columns=names):
        yield batch.to_pandas()


def _plain(handle: pq.ParquetFile, bits: pq.ParquetFile, batch_rows: int) -> bool:
    """What the bounded path covers: trials that agree on the golden outputs, unprotected, not a causal
    LM's; per-bit rows sorted by trial key (as the campaign writes them)."""
    digests: set = set()
    for frame in _batches(handle, ("golden_digest", "protect", "trial_kind"), batch_rows):
        for column in ("protect", "trial_kind"):
            if column in frame and frame[column].notna().any():
                return False
        if "golden_digest" in frame:
            digests.update(frame["golden_digest"].dropna().unique())
            if len(digests) > 1:
                return False
    last = None
    for frame in _batches(bits, ("trial_key",), batch_rows):
        keys = frame["trial_key"].to_numpy(dtype=object)
        if len(keys) and ((last is not None and keys[0] < last) or bool((keys[1:] < keys[:-1]).any())):
            return False
        last = keys[-1] if len(keys) else last
    return True


def pooled(paths: list, keep: dict[str, set[str]], batch_rows: int = BATCH_ROWS) -> Pooled | None:
    """The rows of one campaign pooled per group, batch by batch (``keep``: as report's, the trials the
    tables may count in a PARTIAL campaign); None where the report reads the whole frames instead:
    several campaigns (compared), protected or causal-LM campaigns, trials whose golden outputs
    disagree, files load() refuses, or no trial to count."""
    if len(paths) != 1:
        return None
    directory = paths[0]
    spec = _check_spec(directory)
    trials_file = _open(directory, R.TRIALS_FILE, REQUIRED_TRIAL_COLUMNS)
    bits_file = _open(directory, R.BITS_FILE, REQUIRED_BIT_COLUMNS)
    if trials_file is None or bits_file is None or trials_file.metadata.num_rows == 0:
        return None
    if not _plain(trials_file, bits_file, batch_rows):
        return None
    allowed = keep.get(str(directory))
    columns = ("campaign", "trial_key", *IDENTITY, *OPTIONAL_IDENTITY, "bit_spec", *SITE_KEYS, "seed", *COUNTS,
               *CLASS_COUNTS)
    trial_sums, trial_seen = _Sums(TRIAL_GROUP), _Seen([c for c, d in TRIAL_DTYPES.items() if d == "category"])
    profiles: dict[tuple, int] = {}
    keys, codes = [], []
    for frame in _batches(trials_file, columns, batch_rows):
        frame["campaign"] = _campaign_name(frame, spec, directory)
        frame["campaign_dir"] = str(directory)
        frame["golden"] = "consistent"  # _plain: at most one golden digest
        for column, default in OPTIONAL_IDENTITY.items():
            frame[column] = frame[column].fillna(default) if column in frame else default
        trial_seen.add(frame)
        profile = frame[list(PROFILE)].astype(object).where(frame[list(PROFILE)].notna(), None)
        codes.append(np.fromiter((profiles.setdefault(p, len(profiles)) for p in profile.itertuples(index=False, name=None)),
                                 dtype=np.int32, count=len(frame)))
        keys.append(frame["trial_key"].to_numpy(dtype=object).astype("S"))
        if allowed is not None:
            frame = frame[frame["trial_key"].isin(allowed)]
        trial_sums.add(frame, np.ones(len(frame), dtype=np.int64))
    trials = trial_sums.frame()
    if trials is None or not len(trials):
        return None
    key_index = np.concatenate(keys)
    order = np.argsort(key_index, kind="stable")
    key_index, codes = key_index[order], np.concatenate(codes)[order]
    del order
    table = pd.DataFrame(list(profiles), columns=list(PROFILE))
    bits, fields = _pool_bits(bits_file, directory, key_index, codes, table, allowed, batch_rows)
    return Pooled(trial_seen.cast(trials, TRIAL_DTYPES), bits, fields)


def _pool_bits(handle, directory, key_index, codes, profiles: pd.DataFrame, allowed, batch_rows: int):
    """The per-bit rows, joined to their trial's identity and pooled per (site, bit) and per field."""
    from analysis.tables import _bits, bit_field, row_formats

    bit_sums, field_sums = _Sums(BIT_GROUP), _Sums(FIELD_GROUP, lowest=("bit",))
    seen = _Seen([c for c, d in BIT_DTYPES.items() if d == "category"])
    formats = row_formats(profiles)
    orphans: list[str] = []
    fields_of: dict[tuple, str] = {}
    last, counted = None, {"bits": set(), "fields": set()}  # the previous batch's last trial and its groups
    any_qparam = False
    for frame in _batches(handle, ("trial_key", "bit", *COUNTS, *CLASS_COUNTS), batch_rows):
        frame = frame[frame["images"] > 0].reset_index(drop=True)
        where = np.searchsorted(key_index, frame["trial_key"].to_numpy(dtype=object).astype("S"))
        where = np.minimum(where, max(len(key_index) - 1, 0))
        found = key_index[where] == frame["trial_key"].to_numpy(dtype=object).astype("S")
        if not found.all():
            orphans = sorted(set(orphans) | set(frame["trial_key"][~found]))[:3]
        frame, code = frame[found].reset_index(drop=True), codes[where[found]]
        frame = pd.concat([frame, profiles.iloc[code].reset_index(drop=True)], axis=1)
        frame[ELEMENT] = np.asarray(formats, dtype=object)[code] if len(code) else []
        seen.add(frame)
        if allowed is not None:
            frame = frame[frame["trial_key"].isin(allowed)].reset_index(drop=True)
        frame = _bits(frame).reset_index(drop=True)  # refuses bits < 0; leaves out random and zero faults
        any_qparam |= bool((frame["kind"].astype(str) == "qparam").any())
        frame["field"] = [fields_of.get((e, b)) or fields_of.setdefault((e, b), bit_field(e, int(b)))
                          for e, b in zip(frame[ELEMENT], frame["bit"])]
        if not len(frame):
            continue
        keys = frame["trial_key"].to_numpy(dtype=object)
        for name, sums in (("bits", bit_sums), ("fields", field_sums)):
            sums.add(frame, _first_of_trial(frame, sums.keys, counted[name] if keys[0] == last else set()))
            counted[name] = _last_trial_groups(frame, sums.keys) | (counted[name] if keys[-1] == last else set())
        last = keys[-1]
    if orphans:
        raise ValueError(
            f"{storage.join(directory, R.BITS_FILE)} has rows of trials not in {R.TRIALS_FILE} (e.g. {orphans}): "
            f"run `python -m campaign resume {directory}` to re-aggregate")
    out = []
    for sums in (bit_sums, field_sums):
        frame = sums.frame()
        frame = frame if frame is not None else pd.DataFrame(columns=[*sums.keys, *COUNTS, *CLASS_COUNTS, "_trials"])
        if not any_qparam:
            frame = frame.drop(columns=[ELEMENT])
        if "field" in frame:
            frame = frame.drop(columns=["field"])  # per_bit_field finds it again from the (lowest) bit
        out.append(seen.cast(frame, BIT_DTYPES))
    return out


def _group_tuples(frame: pd.DataFrame, keys) -> list[tuple]:
    values = frame[list(keys)].astype(object).where(frame[list(keys)].notna(), None)
    return list(zip(frame["trial_key"], values.itertuples(index=False, name=None)))


def _first_of_trial(frame: pd.DataFrame, keys, counted: set) -> np.ndarray:
    """1 for the first row of each (trial, group) in the batch (rows of a trial are contiguous, the file
    being sorted by trial key) unless ``counted`` already holds it (the previous batch's last trial)."""
    first = ~frame.duplicated(subset=["trial_key", *keys])
    if counted and len(frame):
        same = (frame["trial_key"] == next(iter(counted))[0]).to_numpy() & first.to_numpy()
        for i in np.flatnonzero(same):
            if _group_tuples(frame.iloc[[i]], keys)[0] in counted:
                first.iloc[i] = False
    return first.to_numpy(dtype=np.int64)


def _last_trial_groups(frame: pd.DataFrame, keys) -> set:
    """(trial key, group) of the batch's last trial: it may go on in the next batch."""
    if not len(frame):
        return set()
    rows = frame[frame["trial_key"] == frame["trial_key"].iloc[-1]]
    return set(_group_tuples(rows, keys))
