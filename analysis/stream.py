"""The report's tables in bounded memory: trials.parquet and bits.parquet are read a batch of rows
at a time, only the columns the tables need, and each batch's counts are summed per group. The
result is a few small frames with one row per group and a ``_trials`` column holding each group's
trial count. The functions of analysis.tables pool these rows as they pool whole frames
(analysis.tables.pool), so the tables are the same.

The per-bit rows take their trial's identity through a sorted index of the trial keys (about 40
bytes per trial); everything else follows the number of groups of the tables. The largest are the
seed-layout CSV's (site x seed x bit sampling) and the per-seed table's (seed x bit spec).
Covered: one campaign, unprotected, not a causal LM's, whose trials agree on the golden outputs;
the report reads the whole frames for the others.
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
SAMPLING = "bit_sampling"  # as analysis.tables.SAMPLING
# A trial's identity as its per-bit rows carry it (load.TRIAL_KEYS_FOR_ROWS; per-bit tables never group by seed)
PROFILE = tuple(c for c in TRIAL_KEYS_FOR_ROWS if c != "seed")
TRIAL_GROUP = ("campaign", "campaign_dir", *IDENTITY, *OPTIONAL_IDENTITY, "bit_spec", *SITE_KEYS, "seed")
FIELD_GROUP = (*(c for c in PROFILE if c not in SITE_KEYS), ELEMENT, "field")


@dataclass(frozen=True)
class Pooled:
    """A campaign's rows pooled per group: ``sites`` (per site x bit spec: the per-site and per-type
    tables), ``seeds`` (per seed x bit spec: the per-seed table and the campaign summary), ``layout``
    (per site x seed x bit sampling: the seed-layout CSV), ``bits`` (per site x bit: the per-bit and
    site x bit tables) and ``fields`` (per bit field)."""

    sites: pd.DataFrame
    seeds: pd.DataFrame
    layout: pd.DataFrame
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
        work = frame[self.keys].copy()
        for column in (*COUNTS, *self.lowest):
            work[column] = frame[column].to_numpy(dtype=np.int64)
        for column in CLASS_COUNTS:
            values = pd.to_numeric(frame[column], errors="coerce") if column in frame else pd.Series(np.nan, frame.index)
            work[column] = values.fillna(0).to_numpy(dtype=np.int64)
            work[f"_has_{column}"] = values.notna().to_numpy(dtype=np.int64)
        work["_trials"], work["_rows"] = trials.astype(np.int64), 1
        self.parts.append(combine(work, self.keys, self.lowest))
        self.waiting += len(self.parts[-1])
        if self.waiting > max(BATCH_ROWS, 0 if self.done is None else len(self.done)):  # each row combined O(log) times
            self._flush()

    def _flush(self) -> None:
        frames = ([self.done] if self.done is not None else []) + self.parts
        if frames:
            self.done = combine(pd.concat(frames, ignore_index=True), self.keys, self.lowest)
        self.parts, self.waiting = [], 0

    def frame(self) -> pd.DataFrame | None:
        """The groups with their sums (class counts not yet resolved: see ``resolved``)."""
        self._flush()
        return self.done


def combine(frame: pd.DataFrame, keys, lowest=()) -> pd.DataFrame:
    """Rows of the same ``keys`` added up (``lowest``: their minimum), in the order groups first appear."""
    rules = {c: ("min" if c in lowest else "sum") for c in frame.columns if c not in keys}
    return frame.groupby(list(keys), sort=False, dropna=False).agg(rules).reset_index()


def resolved(frame: pd.DataFrame) -> pd.DataFrame:
    """Class counts as Int64, NA for a group where any row lacked them; the helper columns dropped."""
    out = frame.copy()
    for column in CLASS_COUNTS:
        out[column] = out[column].astype("Int64").where(out[f"_has_{column}"] == out["_rows"], pd.NA)
    return out.drop(columns=[f"_has_{c}" for c in CLASS_COUNTS] + ["_rows"])


class _Profiles:
    """Distinct value tuples of some columns, numbered in the order they first appear."""

    def __init__(self, columns) -> None:
        self.columns, self.codes, self.tuples = list(columns), {}, []

    def number(self, values: tuple) -> int:
        if values not in self.codes:
            self.codes[values] = len(self.tuples)
            self.tuples.append(values)
        return self.codes[values]

    def code(self, frame: pd.DataFrame) -> np.ndarray:
        values = frame[self.columns].astype(object).where(frame[self.columns].notna(), None)
        local = values.groupby(self.columns, sort=False, dropna=False).ngroup().to_numpy()
        firsts = values.drop_duplicates().itertuples(index=False, name=None)  # in ngroup's order
        known = np.array([self.number(t) for t in firsts], dtype=np.int64)
        return known[local] if len(local) else np.zeros(0, np.int64)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.tuples, columns=self.columns)


class _Projection:
    """Each code of ``source`` -> the code in ``target`` of its values as ``project`` maps them."""

    def __init__(self, source: _Profiles, target: _Profiles, project) -> None:
        self.source, self.target, self.project, self.map = source, target, project, np.zeros(0, np.int64)

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        if len(self.map) < len(self.source.tuples):
            more = [self.target.number(self.project(dict(zip(self.source.columns, t))))
                    for t in self.source.tuples[len(self.map):]]
            self.map = np.concatenate([self.map, np.array(more, dtype=np.int64)])
        return self.map[codes]


def _expand(frame: pd.DataFrame, profiles: pd.DataFrame, columns) -> pd.DataFrame:
    """``frame`` with its ``_code`` replaced by the ``columns`` of that profile."""
    values = profiles[list(columns)].iloc[frame["_code"].to_numpy()].reset_index(drop=True)
    return pd.concat([values, frame.drop(columns=["_code"]).reset_index(drop=True)], axis=1)


def _cast(frame: pd.DataFrame, dtypes: dict, categories: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the dtypes load() gives these columns; a categorical's categories are the values of
    every row loaded (``categories``: the profiles of those rows), in load's order."""
    out = frame.copy()
    for column in frame.columns:
        dtype = dtypes.get(column)
        if dtype == "category":
            seen = list(pd.unique(categories[column].astype(object))) if column in categories else []
            out[column] = pd.Categorical(frame[column].astype(_STR), categories=_category_order(column, seen))
        elif dtype is not None and dtype not in ("Int64", "float64", "boolean"):
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


def _plain(handle: pq.ParquetFile, bits: pq.ParquetFile, batch_rows: int, per_bit: bool = True) -> bool:
    """What the bounded path covers: trials that agree on the golden outputs, unprotected, not a causal
    LM's; per-bit rows sorted by trial key (as the campaign writes them; checked when ``per_bit``)."""
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
    for frame in _batches(bits, ("trial_key",), batch_rows) if per_bit else ():
        keys = frame["trial_key"].to_numpy(dtype=object)
        if len(keys) and ((last is not None and keys[0] < last) or bool((keys[1:] < keys[:-1]).any())):
            return False
        last = keys[-1] if len(keys) else last
    return True


def pooled(paths: list, keep: dict[str, set[str]], batch_rows: int = BATCH_ROWS, per_bit: bool = True) -> Pooled | None:
    """The rows of one campaign pooled per group, batch by batch (``keep``: as report's, the trials the
    tables may count in a PARTIAL campaign); None where the report reads the whole frames instead:
    several campaigns (compared), protected or causal-LM campaigns, trials whose golden outputs
    disagree, files load() refuses, or no trial to count. ``per_bit=False``: the per-bit rows are
    not read (``bits`` and ``fields`` empty), for the per-site table alone."""
    if len(paths) != 1:
        return None
    directory = paths[0]
    spec = _check_spec(directory)
    trials_file = _open(directory, R.TRIALS_FILE, REQUIRED_TRIAL_COLUMNS)
    bits_file = _open(directory, R.BITS_FILE, REQUIRED_BIT_COLUMNS)
    if trials_file is None or bits_file is None or trials_file.metadata.num_rows == 0:
        return None
    if not _plain(trials_file, bits_file, batch_rows, per_bit):
        return None
    allowed = keep.get(str(directory))
    columns = ("campaign", "trial_key", *IDENTITY, *OPTIONAL_IDENTITY, "bit_spec", *SITE_KEYS, "seed", *COUNTS,
               *CLASS_COUNTS)
    profiles = _Profiles([c for c in TRIAL_GROUP if c != "seed"])  # a trial's groups but its seed: per site
    by_seed = _Profiles([c for c in profiles.columns if c not in SITE_KEYS])
    by_layout = _Profiles([SAMPLING if c == "bit_spec" else c for c in profiles.columns])
    to_seed = _Projection(profiles, by_seed, lambda v: tuple(v[c] for c in by_seed.columns))
    to_layout = _Projection(profiles, by_layout, lambda v: tuple(_sampling(v["bit_spec"]) if c == SAMPLING else v[c]
                                                                 for c in by_layout.columns))
    sums = {"sites": _Sums(("_code",)), "seeds": _Sums(("_code", "seed")), "layout": _Sums(("_code", "seed"))}
    keys, codes = [], []
    for frame in _batches(trials_file, columns, batch_rows):
        frame["campaign"] = _campaign_name(frame, spec, directory)
        frame["campaign_dir"] = str(directory)
        frame["golden"] = "consistent"  # _plain: at most one golden digest
        for column, default in OPTIONAL_IDENTITY.items():
            frame[column] = frame[column].fillna(default) if column in frame else default
        code = profiles.code(frame)
        if per_bit:
            codes.append(code)
            keys.append(frame["trial_key"].to_numpy(dtype=object).astype("S"))
        if allowed is not None:
            chosen = frame["trial_key"].isin(allowed).to_numpy()
            frame, code = frame[chosen], code[chosen]
        one, counts = np.ones(len(frame), dtype=np.int64), frame[[c for c in ("seed", *COUNTS, *CLASS_COUNTS) if c in frame]]
        sums["sites"].add(counts.assign(_code=code), one)
        sums["seeds"].add(counts.assign(_code=to_seed(code)), one)
        sums["layout"].add(counts.assign(_code=to_layout(code)), one)
    if sums["sites"].frame() is None or not len(sums["sites"].frame()):
        return None
    table = profiles.table()  # every trial's profile (the categories load gives)
    frames = {name: _cast(resolved(_expand(sums[name].frame(), p.table(), p.columns)), TRIAL_DTYPES, table)
              for name, p in (("sites", profiles), ("seeds", by_seed), ("layout", by_layout))}
    frames["sites"] = frames["sites"].drop(columns=["seed"], errors="ignore")
    pools = frames["layout"][SAMPLING].astype(str).eq("pool").any()
    frames["layout"][SAMPLING] = pd.Categorical(frames["layout"][SAMPLING].astype(str),
                                                categories=["random", "fixed", *(["pool"] if pools else [])])
    if not per_bit:
        return Pooled(frames["sites"], frames["seeds"], frames["layout"], pd.DataFrame(), pd.DataFrame())
    key_index = np.concatenate(keys)
    order = np.argsort(key_index, kind="stable")
    key_index, codes = key_index[order], np.concatenate(codes)[order]
    del order, keys
    bits, fields = _pool_bits(bits_file, directory, key_index, codes, table, allowed, batch_rows)
    return Pooled(frames["sites"], frames["seeds"], frames["layout"], bits, fields)


def _sampling(bit_spec) -> str:
    """'random', 'fixed' or 'pool': the bit sampling of a bit spec (analysis.tables.with_sampling)."""
    from analysis.tables import with_sampling

    return str(with_sampling(pd.DataFrame({"bit_spec": [bit_spec]}))[SAMPLING].iloc[0])


def _pool_bits(handle, directory, key_index, codes, profiles: pd.DataFrame, allowed, batch_rows: int):
    """The per-bit rows, joined to their trial's profile and pooled per (site, bit) and per field."""
    from analysis.tables import _bits, bit_field, row_formats

    bit_sums, field_sums = _Sums(("_code", "bit")), _Sums(("_code", "field"), lowest=("bit",))
    formats = np.asarray(row_formats(profiles), dtype=object)  # each profile's element format
    faults = profiles["fault"].to_numpy(dtype=object)
    joined = np.zeros(len(profiles), dtype=bool)  # the profiles of per-bit rows (their categories)
    orphans: list[str] = []
    fields_of: dict[tuple, str] = {}
    last, counted = None, {"bits": set(), "fields": set()}  # the previous batch's last trial and its groups
    for frame in _batches(handle, ("trial_key", "bit", *COUNTS, *CLASS_COUNTS), batch_rows):
        frame = frame[frame["images"] > 0].reset_index(drop=True)
        wanted = frame["trial_key"].to_numpy(dtype=object).astype("S")
        where = np.minimum(np.searchsorted(key_index, wanted), len(key_index) - 1)
        found = key_index[where] == wanted
        if not found.all():
            orphans = sorted(set(orphans) | set(frame["trial_key"][~found]))[:3]
        frame = frame[found].reset_index(drop=True)
        frame["_code"] = codes[where[found]]
        joined[frame["_code"].to_numpy()] = True
        if allowed is not None:
            frame = frame[frame["trial_key"].isin(allowed)].reset_index(drop=True)
        kept = _bits(pd.DataFrame({"bit": frame["bit"], "fault": faults[frame["_code"].to_numpy()]}))  # refuses bit < 0
        frame = frame.loc[kept.index].reset_index(drop=True)  # random and zero faults: no bit position
        if not len(frame):
            continue
        frame["field"] = [fields_of.get((e, b)) or fields_of.setdefault((e, b), bit_field(e, int(b)))
                          for e, b in zip(formats[frame["_code"].to_numpy()], frame["bit"])]
        keys = frame["trial_key"].to_numpy(dtype=object)
        for name, sums in (("bits", bit_sums), ("fields", field_sums)):
            sums.add(frame, _first_of_trial(frame, sums.keys, counted[name] if keys[0] == last else set()))
            counted[name] = _last_trial_groups(frame, sums.keys) | (counted[name] if keys[-1] == last else set())
        last = keys[-1]
    if orphans:
        raise ValueError(
            f"{storage.join(directory, R.BITS_FILE)} has rows of trials not in {R.TRIALS_FILE} (e.g. {orphans}): "
            f"run `python -m campaign resume {directory}` to re-aggregate")
    profiles = profiles.assign(**{ELEMENT: formats})
    qparam = False
    out = []
    for sums, columns in ((bit_sums, (*PROFILE, ELEMENT)), (field_sums, FIELD_GROUP[:-1])):
        frame = sums.frame()
        if frame is None:
            frame = pd.DataFrame({c: pd.Series(dtype=np.int64) for c in (*sums.keys, *COUNTS, *sums.lowest, "_trials", "_rows",
                                                                        *CLASS_COUNTS, *(f"_has_{c}" for c in CLASS_COUNTS))})
        frame = _expand(frame, profiles, columns)
        if sums is field_sums:  # trials of several sites pooled per field: their counts add up
            frame = combine(frame, FIELD_GROUP, ("bit",)).drop(columns=["field"])  # per_bit_field finds it from the bit
        qparam |= bool((frame["kind"].astype(str) == "qparam").any())
        out.append(resolved(frame))
    return [_cast(f if qparam else f.drop(columns=[ELEMENT]), BIT_DTYPES, profiles[joined]) for f in out]


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
