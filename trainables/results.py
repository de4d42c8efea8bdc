"""The on-disk result format (torch-free): explicit, versioned pyarrow schemas and atomic
per-trial writes.

A campaign directory holds::

    spec.json             resolved spec, seeds, library versions, schema_version
    parts/trials/K.parquet  one row per trial K
    parts/bits/K.parquet    per-bit outcome counts of trial K
    faults/K.parquet        per-fault rows of trial K (record level changed|all)
    parts/done/K.json       trial K's commit marker: its files with sizes and SHA-256 (written
                            last on a local disk, beside them on an object store; a trial is
                            finished only while every file it lists matches)
    trials.parquet          all trial rows, aggregated by the campaign driver
    bits.parquet            all per-bit rows, aggregated likewise

K = trial_key(kind, site, bit, seed): a re-run or retried trial replaces its own files.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from trainables import storage
from trainables.inject.bitpools import key_text

SCHEMA_VERSION = 1
VERSION_KEY = b"bitflip.schema_version"

TRIAL_SCHEMA = pa.schema(
    [
        ("campaign", pa.string()),
        ("trial_key", pa.string()),
        ("model", pa.string()),
        ("dataset", pa.string()),
        ("synthetic", pa.bool_()),
        ("mode", pa.string()),
        ("kind", pa.string()),
        ("site_index", pa.int32()),
        ("site_name", pa.string()),
        ("site_call", pa.int32()),  # null for param sites (a tensor has no calls)
        ("site_type", pa.string()),  # param sites: the type of the module owning the tensor
        ("site_output_index", pa.int16()),  # neuron sites on a tuple/list output: the element flipped; else null
        ("bit_spec", pa.string()),
        ("bit", pa.int16()),
        ("seed", pa.int64()),
        ("images_per_weight_fault", pa.int64()),
        ("batch_size", pa.int32()),
        ("images", pa.int64()),
        ("golden_correct", pa.int64()),
        ("mismatches", pa.int64()),
        ("changed", pa.int64()),
        ("nonfinite", pa.int64()),
        ("sdc", pa.int64()),  # outcome classes: masked + sdc + nonfinite = images
        ("masked", pa.int64()),
        ("failures", pa.int64()),  # golden-correct images whose top-1 changed or whose logits are non-finite
        ("misclassification_rate", pa.float64()),
        ("sdc_rate", pa.float64()),
        ("nonfinite_rate", pa.float64()),
        ("masked_rate", pa.float64()),
        ("failure_rate", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("stopped_early", pa.bool_()),
        ("wall_s", pa.float64()),
        ("device", pa.string()),
        ("hardware", pa.string()),  # CPU model + ATen capability (+ int8 engine and kernels), or GPU model + capability
        ("torch_version", pa.string()),
        ("golden_digest", pa.string()),  # the golden logits and predictions: differs where machines compute differently
        ("started_at", pa.float64()),
        ("worker", pa.string()),
        ("path", pa.string()),  # "prefix": the suffix ran on cached golden activations; "full": whole forward passes
        ("fault", pa.string()),  # the fault model (flip, flip:K, burst:K, stuck0, stuck1, random, zero); null = flip
        ("effective", pa.int64()),  # faults that changed the stored bits (a stuck-at on a bit already set does not)
        ("weight_format", pa.string()),  # fp8 weight storage (fp8_e4m3fn, fp8_e5m2) of the campaign; null: the mode's dtype
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)

BIT_SCHEMA = pa.schema(
    [
        ("campaign", pa.string()),
        ("trial_key", pa.string()),
        ("bit", pa.int16()),
        ("images", pa.int64()),
        ("golden_correct", pa.int64()),
        ("mismatches", pa.int64()),
        ("changed", pa.int64()),
        ("nonfinite", pa.int64()),
        ("sdc", pa.int64()),
        ("failures", pa.int64()),
        ("effective", pa.int64()),  # faults that changed the stored bits; bit = a multi-bit fault's first (lowest) bit
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)

FAULT_SCHEMA = pa.schema(
    [
        ("campaign", pa.string()),
        ("trial_key", pa.string()),
        ("kind", pa.string()),
        ("site_index", pa.int32()),
        ("site_name", pa.string()),  # the module, or for param faults the tensor's qualified name
        ("seed", pa.int64()),
        ("image", pa.int64()),
        ("label", pa.int64()),
        ("golden", pa.int64()),
        ("faulty", pa.int64()),
        ("golden_correct", pa.bool_()),
        ("changed", pa.bool_()),
        ("nonfinite", pa.bool_()),
        ("outcome", pa.string()),  # masked, sdc (finite logits, top-1 changed) or nonfinite
        ("position", pa.int64()),
        ("fault_group", pa.int64()),
        ("bit", pa.int16()),
        ("raw_before", pa.int64()),
        ("value_before", pa.float64()),
        ("value_after", pa.float64()),
        ("fault", pa.string()),  # the fault model; null = flip
        ("effective", pa.bool_()),  # the fault changed the stored bits
        ("fault_mask", pa.int64()),  # the bits the fault targets, signed like raw_before; bit = its lowest
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)

# Paired trials of a protected campaign (trainables.inject.protection): appended after every
# other column, null in unprotected campaigns. Counts are against the unprotected golden top-1.
PROTECTION_TRIAL_FIELDS = [
    ("protect", pa.string()),  # the protection spec (clamp:..., relu6, ranger[:...]); null = none
    *[(name, pa.int64()) for name in (
        "protected_mismatches", "protected_nonfinite", "pair_both", "pair_unprotected_only", "pair_protected_only",
        "faulty_correct", "protected_faulty_correct", "protected_clean_correct", "detected", "detected_mismatches",
        "clean_alarms")],
    ("protected_misclassification_rate", pa.float64()),
    ("protected_ci_low", pa.float64()),
    ("protected_ci_high", pa.float64()),
    ("mcnemar_p", pa.float64()),  # exact two-sided McNemar p of pair_unprotected_only vs pair_protected_only
]
PROTECTION_BIT_FIELDS = [(name, pa.int64()) for name in
                         ("protected_mismatches", "pair_both", "pair_unprotected_only", "pair_protected_only")]
PROTECTION_FAULT_FIELDS = [("protected_faulty", pa.int64()), ("protected_changed", pa.bool_()),
                           ("protected_nonfinite", pa.bool_()), ("protected_raw_before", pa.int64()),
                           ("detected", pa.bool_())]


def _extended(schema: pa.Schema, extra: list) -> pa.Schema:
    return pa.schema(list(schema) + [pa.field(n, t) for n, t in extra], metadata=schema.metadata)


# Teacher-forced (next-token) trials of a causal LM (trainables.inject.tokens): appended after the
# protection columns, null in classification rows (whose trial_kind is null). In these rows images =
# sequences (one fault each), golden_correct = mismatches = 0 (no classification), and changed,
# nonfinite, sdc, effective count sequences; the sums run over the sequences with finite logits.
TOKEN_COUNT_COLUMNS = ("sequences", "tokens", "token_changes", "token_changes_sq", "finite")
TOKEN_SUM_COLUMNS = ("log_ppl_ratio_sum", "log_ppl_ratio_sq_sum", "kl_sum", "kl_sq_sum")
TOKEN_TRIAL_FIELDS = [
    ("trial_kind", pa.string()),  # "teacher-forced"; null: a classification trial
    ("seq_len", pa.int64()),
    *[(name, pa.int64()) for name in TOKEN_COUNT_COLUMNS],
    *[(name, pa.float64()) for name in TOKEN_SUM_COLUMNS],
    *[(name, pa.float64()) for name in ("token_change_rate", "changed_rate", "mean_log_ppl_ratio", "mean_kl")],
]
# per-bit and per-fault rows take trial_kind from their trial's row (analysis joins it)
TOKEN_BIT_FIELDS = [*[(name, pa.int64()) for name in TOKEN_COUNT_COLUMNS],
                    *[(name, pa.float64()) for name in TOKEN_SUM_COLUMNS]]
TOKEN_FAULT_FIELDS = [("token", pa.int64()), ("token_changes", pa.int64()),
                      ("first_change", pa.int64()), ("log_ppl_ratio", pa.float64()), ("kl", pa.float64())]

TRIAL_SCHEMA = _extended(_extended(TRIAL_SCHEMA, PROTECTION_TRIAL_FIELDS), TOKEN_TRIAL_FIELDS)
BIT_SCHEMA = _extended(_extended(BIT_SCHEMA, PROTECTION_BIT_FIELDS), TOKEN_BIT_FIELDS)
FAULT_SCHEMA = _extended(_extended(FAULT_SCHEMA, PROTECTION_FAULT_FIELDS), TOKEN_FAULT_FIELDS)

TRIALS_FILE, BITS_FILE, FAULTS_DIR, PARTS_DIR, SPEC_FILE = "trials.parquet", "bits.parquet", "faults", "parts", "spec.json"

def trial_key(kind: str, site_index: int, bit_spec: str | int, seed: int, fault: str = "flip") -> str:
    """Stable file-name key of one trial, e.g. 'neuron-s0005-b23-seed17' or '...-brandom-...';
    a fault model other than flip is appended ('...-seed17-burst2'), so flip keys never change;
    a bit pool reads '...-brandom23-30-...' (trainables.inject.bitpools.key_text)."""
    suffix = "" if fault in (None, "flip") else "-" + str(fault).replace(":", "")
    site = "all" if int(site_index) == -1 else f"{int(site_index):04d}"  # -1: a proportional trial's site pool
    return f"{kind}-s{site}-b{key_text(bit_spec)}-seed{int(seed)}{suffix}"

def atomic_write_bytes(data: bytes, path: Path | str) -> None:
    """Write ``data`` to ``path`` (a local path or a URI) whole: through a temporary file and
    a rename on a local disk, one PUT on an object store. Readers never see half a file, and
    a rewrite replaces the old one."""
    storage.write_bytes(path, data)

def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of a parquet file."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()

def atomic_write_table(table: pa.Table, path: Path | str) -> dict:
    """Write ``table`` to ``path`` atomically; return its size and SHA-256 (for a commit marker)."""
    data = parquet_bytes(table)
    atomic_write_bytes(data, path)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

def table_from_rows(rows: Iterable[Mapping], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly ``schema``'s columns from row dicts (extra keys refused)."""
    rows = list(rows)
    names = set(schema.names)
    for row in rows:
        if set(row) != names:
            missing, extra = names - set(row), set(row) - names
            raise ValueError(f"row does not match schema: missing {sorted(missing)}, unexpected {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)

def table_from_columns(columns: Mapping, schema: pa.Schema) -> pa.Table:
    """Build a table from equal-length column arrays, cast to ``schema``."""
    if set(columns) != set(schema.names):
        raise ValueError(f"columns do not match schema: {sorted(set(schema.names) ^ set(columns))}")
    return pa.table({name: pa.array(columns[name], type=schema.field(name).type) for name in schema.names}, schema=schema)

DONE_DIR = "done"  # under parts/: one commit marker per finished trial


def _trial_files(key: str) -> dict[str, str]:
    """The files trial ``key`` may have, by role, relative to the campaign directory."""
    return {"faults": f"{FAULTS_DIR}/{key}.parquet", "bits": f"{PARTS_DIR}/bits/{key}.parquet",
            "trial": f"{PARTS_DIR}/trials/{key}.parquet"}


def marker_path(campaign_dir: str | Path, key: str) -> Path | str:
    return storage.join(campaign_dir, PARTS_DIR, DONE_DIR, f"{key}.json")


def _campaign_location(campaign_dir: str | Path) -> Path | str:
    """A campaign directory as given: a Path, or a URI string (never a Path, which would
    collapse 's3://' into a local folder named 's3:')."""
    return campaign_dir if storage.is_uri(campaign_dir) else Path(campaign_dir)


def uncommit_trial(campaign_dir: str | Path, key: str) -> Future | None:
    """Start removing trial ``key``'s commit marker, then its faults file, before the trial
    runs (again): on an object store in a background thread, so the requests overlap the
    trial's computation; ``write_trial(..., uncommitted=)`` waits for them. None on a local
    disk, where write_trial removes them itself."""
    if not storage.is_uri(campaign_dir):
        return None
    global _UNCOMMITS
    if _UNCOMMITS is None:
        _UNCOMMITS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bitflip-uncommit")
    location = _campaign_location(campaign_dir)
    return _UNCOMMITS.submit(_uncommit, location, key)


_UNCOMMITS: ThreadPoolExecutor | None = None


def _uncommit(campaign_dir: str | Path, key: str) -> None:
    storage.delete(marker_path(campaign_dir, key))
    storage.delete(storage.join(campaign_dir, _trial_files(key)["faults"]))


def write_trial(campaign_dir: str | Path, trial_row: Mapping, bit_rows: Iterable[Mapping], fault_columns: Mapping | None,
                *, uncommitted: Future | None = None,
                while_writing: Callable[[dict[str, dict]], None] | None = None) -> dict[str, dict]:
    """Write one trial's results (faults, per-bit counts, the trial row) and its commit marker,
    which lists each file's size and SHA-256: the trial is finished only while every file it
    lists matches. ``uncommitted``: the trial's ``uncommit_trial``, begun when it started.
    ``while_writing(what the marker lists)`` runs while the files are written (a report to
    the driver, overlapping the writes); this returns once they are all written.

    On a local disk the marker is removed first and written last. On an object store the
    files and the marker are PUT at once, in one round trip: a marker that lands before its
    files, or beside one that failed, lists digests they do not match, so the trial reads as
    unfinished until every file has landed. Returns what the marker lists."""
    campaign_dir = _campaign_location(campaign_dir)
    key = trial_row["trial_key"]
    if uncommitted is None:
        storage.delete(marker_path(campaign_dir, key))  # uncommitted while its files change
    else:
        uncommitted.result()  # marker and faults file removed already
    paths = _trial_files(key)
    faults = (table_from_columns(fault_columns, FAULT_SCHEMA)
              if fault_columns is not None and len(fault_columns["image"]) else None)
    if faults is None and uncommitted is None:  # no faults recorded: none may stay from an earlier run
        storage.delete(storage.join(campaign_dir, paths["faults"]))
    tables = {paths["faults"]: faults, paths["bits"]: table_from_rows(bit_rows, BIT_SCHEMA),
              paths["trial"]: table_from_rows([trial_row], TRIAL_SCHEMA)}
    files = {name: parquet_bytes(table) for name, table in tables.items() if table is not None}
    committed = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    marker = _marker_bytes(key, committed)
    writes = [(storage.join(campaign_dir, name), data) for name, data in files.items()]
    writes.append((marker_path(campaign_dir, key), marker))

    def write_in_order() -> None:  # a local disk: the marker last
        for path, data in writes:
            atomic_write_bytes(data, path)

    on_store = storage.is_uri(campaign_dir)  # there each request waits on the network: all at once
    with ThreadPoolExecutor(max_workers=len(writes) if on_store else 1, thread_name_prefix="bitflip-write") as pool:
        writing = ([pool.submit(atomic_write_bytes, data, path) for path, data in writes] if on_store
                   else [pool.submit(write_in_order)])
        try:
            if while_writing is not None:
                while_writing(committed)
        finally:
            for write in writing:
                write.result()
    return committed


def commit_trial(campaign_dir: str | Path, key: str, files: Mapping[str, Mapping]) -> None:
    """Write trial ``key``'s commit marker: {relative path: {size, sha256}} of its files."""
    atomic_write_bytes(_marker_bytes(key, files), marker_path(campaign_dir, key))


def _marker_bytes(key: str, files: Mapping[str, Mapping]) -> bytes:
    return json.dumps({"trial_key": key, "files": dict(files)}, indent=1, sort_keys=True).encode()


@dataclass(frozen=True)
class TrialCheck:
    """The state of a campaign's trial files: committed and intact, or damaged (key -> why)."""

    finished: frozenset[str]
    damaged: dict[str, str]


def _file_problem(path: Path | str, expected: Mapping, keep: list | None = None) -> str | None:
    """Why ``path`` does not match its marker entry, or None when it does (then its bytes
    are appended to ``keep``, if given: a caller that needs the content reads it once)."""
    if storage.is_uri(path) or (keep is not None and storage.is_file(path)):  # one read: size and content at once
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            return "missing"
        size, digest = len(data), lambda: hashlib.sha256(data).hexdigest()
    else:
        data, size, digest = None, storage.file_size(path), lambda: storage.sha256(path)
    if size is None:
        return "missing"
    if size != expected.get("size"):
        return f"{size} bytes, {expected.get('size')} committed"
    if digest() != expected.get("sha256"):
        return "content differs from the committed SHA-256"
    if keep is not None and data is not None:
        keep.append(data)
    return None


def _part_schema(name: str) -> pa.Schema | None:
    """The schema of a trial's part file that aggregate gathers (by its relative path), else None."""
    role = name.split("/")[1] if name.startswith(f"{PARTS_DIR}/") and name.count("/") == 2 else None
    return {"trials": TRIAL_SCHEMA, "bits": BIT_SCHEMA}.get(role)


def check_trials(campaign_dir: str | Path, keys: Iterable[str] | None = None, *,
                 tables: dict[str, pa.Table] | None = None,
                 verified: Mapping[str, Mapping[str, pa.Table]] | None = None) -> TrialCheck:
    """Verify the commit markers (of ``keys``, or all): a trial is finished when its marker
    is readable and every file it lists has the committed size and SHA-256. ``tables``, if
    given, receives the finished trials' trial and bits parts as read (by relative path).
    ``verified`` ({key: its parts}, from a CommitWatch): trials checked as they finished, not
    read again while their marker is listed."""
    campaign_dir = _campaign_location(campaign_dir)
    folder = storage.join(campaign_dir, PARTS_DIR, DONE_DIR)
    markers = {n[: -len(".json")]: storage.join(folder, n) for n in storage.list_names(folder, ".json")}
    if keys is not None:
        wanted = set(keys)
        markers = {k: p for k, p in markers.items() if k in wanted}
    known = {k for k in (verified or {}) if k in markers}
    if tables is not None:
        for key in known:
            tables.update(verified[key])
    state = _check_markers(campaign_dir, {k: p for k, p in markers.items() if k not in known}, tables)
    return TrialCheck(state.finished | known, state.damaged)


def _check_markers(campaign_dir: Path | str, markers: Mapping[str, Path | str],
                   tables: dict[str, pa.Table] | None) -> TrialCheck:
    """check_trials of the markers given ({key: path}); one that cannot be read is damaged."""
    finished, damaged = set(), {}

    def marker_problems(item: tuple[str, Path | str]) -> tuple[list[str], dict[str, pa.Table]]:
        key, path = item
        try:
            files = json.loads(storage.read_bytes(path))["files"]
            return _listed_problems(campaign_dir, files, tables is not None)
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            return [f"{PARTS_DIR}/{DONE_DIR}/{key}.json unreadable"], {}

    items = sorted(markers.items())
    for (key, _), (problems, read) in zip(items, storage.map_io(marker_problems, items, campaign_dir)):
        if problems:
            damaged[key] = "; ".join(problems)
        else:
            finished.add(key)
            if tables is not None:
                tables.update(read)
    return TrialCheck(frozenset(finished), damaged)


def _listed_problems(campaign_dir: Path | str, files: Mapping[str, Mapping],
                     keep_tables: bool) -> tuple[list[str], dict[str, pa.Table]]:
    """What is wrong with the files a commit lists ({relative path: {size, sha256}}), and,
    when nothing is and ``keep_tables``, the trial and bits parts as read."""
    kept: dict[str, list] = {}
    problems = []
    for name, expected in sorted(files.items()):
        keep = kept.setdefault(name, []) if keep_tables and _part_schema(name) else None
        why = _file_problem(storage.join(campaign_dir, name), expected, keep)
        if why is not None:
            problems.append(f"{name} {why}")
    if problems:
        return problems, {}
    return [], {name: pq.read_table(pa.BufferReader(data[0]), schema=_part_schema(name))
                for name, data in kept.items() if data}


class CommitWatch:
    """Checks each trial's commit as soon as it finishes, in background threads, so that the
    campaign's final ``check_and_aggregate(..., verified=watch.results())`` reads only the
    trials it has not seen (on an object store every read is a request). A trial checked
    against the commit it reported counts only while its marker is listed at the end."""

    def __init__(self, campaign_dir: str | Path, threads: int = 4) -> None:
        self.campaign_dir = _campaign_location(campaign_dir)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bitflip-commits")
        self._checks: dict[str, Future] = {}

    def __reduce__(self):  # Tune pickles its callbacks (tuner.pkl): a copy starts with no checks
        return CommitWatch, (self.campaign_dir,)

    def finished(self, key: str, committed: Mapping[str, Mapping] | None = None) -> None:
        """Trial ``key`` says it finished, having committed ``committed`` (what its marker
        lists, if it said): check its files against that (else its marker), keep its parts."""
        if key not in self._checks:
            self._checks[key] = self._pool.submit(self._check, key, committed)

    def _check(self, key: str, committed: Mapping[str, Mapping] | None) -> dict[str, pa.Table] | None:
        if committed is None:
            tables: dict[str, pa.Table] = {}
            state = _check_markers(self.campaign_dir, {key: marker_path(self.campaign_dir, key)}, tables)
            return tables if key in state.finished else None
        problems, tables = _listed_problems(self.campaign_dir, committed, keep_tables=True)
        return None if problems else tables

    def results(self) -> dict[str, dict[str, pa.Table]]:
        """{key: its parts as read} of every trial whose commit checked out (waits for the
        checks); the others are left to the final check."""
        self._pool.shutdown(wait=True)
        verified = {}
        for key, check in self._checks.items():
            tables = None if check.exception() is not None else check.result()
            if tables is not None:
                verified[key] = tables
        return verified


def discard_trial(campaign_dir: str | Path, key: str) -> None:
    """Remove trial ``key``'s marker and files (so no damaged file stays in faults/)."""
    storage.delete(marker_path(campaign_dir, key))
    for name in _trial_files(key).values():
        storage.delete(storage.join(campaign_dir, name))


def finished_keys(campaign_dir: str | Path) -> set[str]:
    """Keys of the trials whose files are all committed and intact."""
    return set(check_trials(campaign_dir).finished)


def rename_campaign(campaign_dir: str | Path, name: str) -> int:
    """Set the ``campaign`` column of every finished trial's files to ``name`` and recommit
    them (a moved or copied campaign keeps one name); returns how many trials changed."""
    campaign_dir = _campaign_location(campaign_dir)
    changed = 0
    for key in sorted(check_trials(campaign_dir).finished):
        files = json.loads(storage.read_bytes(marker_path(campaign_dir, key)))["files"]
        tables = {f: storage.read_table(storage.join(campaign_dir, f)) for f in files}
        if all(set(t.column("campaign").to_pylist()) <= {name} for t in tables.values()):
            continue
        storage.delete(marker_path(campaign_dir, key))
        new = {}
        for f, table in tables.items():
            index = table.schema.get_field_index("campaign")
            table = table.set_column(index, table.schema.field(index), pa.array([name] * table.num_rows, pa.string()))
            new[f] = atomic_write_table(table, storage.join(campaign_dir, f))
        commit_trial(campaign_dir, key, new)
        changed += 1
    return changed

def _concat_parts(campaign_dir: Path | str, role: str, schema: pa.Schema, keys: set[str] | None,
                  read: Mapping[str, pa.Table] | None = None) -> pa.Table:
    """The ``role`` parts (trials or bits) of ``keys``, concatenated; those in ``read`` (by
    relative path) were read already."""
    folder, read = storage.join(campaign_dir, PARTS_DIR, role), read or {}
    names = [n for n in storage.list_names(folder, ".parquet") if keys is None or n[: -len(".parquet")] in keys]

    def part(n: str) -> pa.Table:
        name = f"{PARTS_DIR}/{role}/{n}"
        return read[name] if name in read else storage.read_table(storage.join(folder, n), schema=schema)

    tables = storage.map_io(part, names, folder)
    return pa.concat_tables(tables).replace_schema_metadata(schema.metadata) if tables else schema.empty_table()

def aggregate(campaign_dir: str | Path, keys: Iterable[str] | None = None, *,
              _read: Mapping[str, pa.Table] | None = None) -> pa.Table:
    """Gather finished trials (``keys``, default: every committed and intact trial) into trials.parquet and bits.parquet,
    sorted by kind, site, bit spec and seed. Returns the trials table."""
    campaign_dir = _campaign_location(campaign_dir)
    if keys is None:
        return check_and_aggregate(campaign_dir)[1]
    wanted = set(keys)
    trials = _concat_parts(campaign_dir, "trials", TRIAL_SCHEMA, wanted, _read)
    trials = trials.sort_by([("kind", "ascending"), ("site_index", "ascending"), ("bit", "ascending"), ("seed", "ascending")])
    done = set(trials.column("trial_key").to_pylist())
    bits = _concat_parts(campaign_dir, "bits", BIT_SCHEMA, done, _read)
    bits = bits.sort_by([("trial_key", "ascending"), ("bit", "ascending")])
    atomic_write_table(trials, storage.join(campaign_dir, TRIALS_FILE))
    atomic_write_table(bits, storage.join(campaign_dir, BITS_FILE))
    return trials


def check_and_aggregate(campaign_dir: str | Path, keys: Iterable[str] | None = None, *,
                        verified: Mapping[str, Mapping[str, pa.Table]] | None = None) -> tuple[TrialCheck, pa.Table]:
    """``check_trials`` (of ``keys``, or all; ``verified`` as there), then ``aggregate`` of the
    finished ones, reading each part file once (on an object store every read is a request)."""
    read: dict[str, pa.Table] = {}
    state = check_trials(campaign_dir, keys, tables=read, verified=verified)
    return state, aggregate(campaign_dir, state.finished, _read=read)

def write_spec(campaign_dir: str | Path, spec: Mapping) -> None:
    """Write spec.json atomically, stamped with the schema version."""

    text = json.dumps({**spec, "schema_version": SCHEMA_VERSION}, indent=2, sort_keys=True, default=str)
    storage.write_bytes(storage.join(campaign_dir, SPEC_FILE), text.encode())

def read_spec(campaign_dir: str | Path) -> dict:
    """Read spec.json; ValueError if the directory is not a campaign."""

    path = storage.join(campaign_dir, SPEC_FILE)
    if not storage.is_file(path):
        raise ValueError(f"{campaign_dir} is not a campaign directory: no {SPEC_FILE}")
    try:
        return json.loads(storage.read_bytes(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
