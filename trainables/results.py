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

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import uuid
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
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

# Generation trials of a causal LM (trainables.inject.generation, trainables.generation_trial): appended
# last, null in classification and teacher-forced rows. In these rows trial_kind = "generation",
# images = faults (one per prompt, or per prompt and listed step), changed = faults whose continuation
# differs from the golden one, sdc = changed with finite logits at every step run, masked = the rest
# of the finite ones; golden_correct = mismatches = 0. First-divergence sums run over the changed faults.
GEN_SUM_COLUMNS = ("first_divergence_sum", "first_divergence_sq_sum", "edit_distance_sum", "edit_distance_sq_sum")
GEN_STEP_COLUMNS = ("faults_by_step", "sdc_by_step", "nonfinite_by_step")  # per fault step 0..new_tokens-1
GEN_TRIAL_FIELDS = [
    ("new_tokens", pa.int64()),
    ("decode_step", pa.string()),  # the trial's steps: "3" (one listed step), "random", "prefill"; null: weight/param
    ("identical", pa.int64()),
    *[(name, pa.float64()) for name in GEN_SUM_COLUMNS],
    *[(name, pa.float64()) for name in ("identical_rate", "mean_first_divergence", "mean_edit_distance")],
    *[(name, pa.list_(pa.int64())) for name in GEN_STEP_COLUMNS],
]
GEN_BIT_FIELDS = [("identical", pa.int64()), *[(name, pa.float64()) for name in GEN_SUM_COLUMNS]]
GEN_FAULT_FIELDS = [("step", pa.int64()), ("kv_position", pa.int64()), ("first_divergence", pa.int64()),
                    ("edit_distance", pa.float64())]

TRIAL_SCHEMA = _extended(_extended(_extended(TRIAL_SCHEMA, PROTECTION_TRIAL_FIELDS), TOKEN_TRIAL_FIELDS), GEN_TRIAL_FIELDS)
BIT_SCHEMA = _extended(_extended(_extended(BIT_SCHEMA, PROTECTION_BIT_FIELDS), TOKEN_BIT_FIELDS), GEN_BIT_FIELDS)
FAULT_SCHEMA = _extended(_extended(_extended(FAULT_SCHEMA, PROTECTION_FAULT_FIELDS), TOKEN_FAULT_FIELDS), GEN_FAULT_FIELDS)

TRIALS_FILE, BITS_FILE, FAULTS_DIR, PARTS_DIR, SPEC_FILE = "trials.parquet", "bits.parquet", "faults", "parts", "spec.json"

def trial_key(kind: str, site_index: int, bit_spec: str | int, seed: int, fault: str = "flip",
              step: int | str | None = None) -> str:
    """Stable file-name key of one trial, e.g. 'neuron-s0005-b23-seed17' or '...-brandom-...';
    a fault model other than flip is appended ('...-seed17-burst2'), so flip keys never change;
    a bit pool reads '...-brandom23-30-...' (trainables.inject.bitpools.key_text). A generation
    trial's decode step (3, random, prefill) ends it: '...-seed17-step3'."""
    suffix = "" if fault in (None, "flip") else "-" + str(fault).replace(":", "")
    suffix += "" if step is None else f"-step{step}"
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
        wanted = keys if isinstance(keys, AbstractSet) else set(keys)  # a set-like view is used as it is (campaign.grid)
        markers = {k: p for k, p in markers.items() if k in wanted}
    known = {k for k in (verified or {}) if k in markers}
    if tables is not None:
        for key in known:
            if _has_room(tables):
                tables.update(verified[key])
    state = _check_markers(campaign_dir, {k: p for k, p in markers.items() if k not in known}, tables)
    return TrialCheck(state.finished | known, state.damaged)


def _check_markers(campaign_dir: Path | str, markers: Mapping[str, Path | str],
                   tables: dict[str, pa.Table] | None) -> TrialCheck:
    """check_trials of the markers given ({key: path}); one that cannot be read is damaged.
    Checked a batch at a time, so that at most KEEP_PARTS trials' parts are kept."""
    finished, damaged = set(), {}

    def marker_problems(item: tuple[str, Path | str], keep: bool) -> tuple[list[str], dict[str, bytes]]:
        key, path = item
        try:
            files = json.loads(storage.read_bytes(path))["files"]
            return _listed_problems(campaign_dir, files, keep)
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            return [f"{PARTS_DIR}/{DONE_DIR}/{key}.json unreadable"], {}

    items = sorted(markers.items())
    for start in range(0, len(items), CHECK_BATCH):
        batch = items[start:start + CHECK_BATCH]
        keep = _has_room(tables)
        for (key, _), (problems, read) in zip(batch, storage.map_io(lambda item: marker_problems(item, keep), batch,
                                                                     campaign_dir)):
            if problems:
                damaged[key] = "; ".join(problems)
            else:
                finished.add(key)
                if read and _has_room(tables):
                    tables.update(read)
    return TrialCheck(frozenset(finished), damaged)


CHECK_BATCH = 1024  # commit markers checked at a time


def _listed_problems(campaign_dir: Path | str, files: Mapping[str, Mapping],
                     keep_tables: bool) -> tuple[list[str], dict[str, bytes]]:
    """What is wrong with the files a commit lists ({relative path: {size, sha256}}), and,
    when nothing is and ``keep_tables``, the trial and bits part files' bytes as read."""
    kept: dict[str, list] = {}
    problems = []
    for name, expected in sorted(files.items()):
        keep = kept.setdefault(name, []) if keep_tables and _part_schema(name) else None
        why = _file_problem(storage.join(campaign_dir, name), expected, keep)
        if why is not None:
            problems.append(f"{name} {why}")
    if problems:
        return problems, {}
    return [], {name: data[0] for name, data in kept.items() if data}


KEEP_PARTS = 2048  # trials whose part files the driver keeps, as read, for the final aggregation (beyond: read again)
NO_PARTS: Mapping[str, bytes] = MappingProxyType({})  # a verified trial's parts past KEEP_PARTS: one shared empty map


def _has_room(tables: Mapping | None) -> bool:
    """Whether ``tables`` (parts kept by relative path, two per trial) may keep another trial's parts."""
    return tables is not None and len(tables) < 2 * KEEP_PARTS


def _part_table(name: str, kept: bytes | pa.Table) -> pa.Table:
    """A kept part (its file's bytes, or a table) as a table of its role's schema."""
    return kept if isinstance(kept, pa.Table) else pq.read_table(pa.BufferReader(kept), schema=_part_schema(name))


class CommitWatch:
    """Checks each trial's commit as soon as it finishes, in background threads, so that the
    campaign's final ``check_and_aggregate(..., verified=watch.results())`` reads only the
    trials it has not seen (on an object store every read is a request). A trial checked
    against the commit it reported counts only while its marker is listed at the end. The
    parts of at most KEEP_PARTS trials are kept (as their files' bytes); of the others only
    that they checked out, so the watch stays small however many trials a campaign has."""

    def __init__(self, campaign_dir: str | Path, threads: int = 4) -> None:
        self.campaign_dir = _campaign_location(campaign_dir)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bitflip-commits")
        self._lock = threading.Lock()
        self._pending: dict[str, Future] = {}
        self._verified: dict[str, dict[str, bytes]] = {}  # key -> its parts as read ({} past KEEP_PARTS)
        self._seen: set[str] = set()
        self._kept = 0

    def __reduce__(self):  # Tune pickles its callbacks (tuner.pkl): a copy starts with no checks
        return CommitWatch, (self.campaign_dir,)

    def finished(self, key: str, committed: Mapping[str, Mapping] | None = None) -> None:
        """Trial ``key`` says it finished, having committed ``committed`` (what its marker
        lists, if it said): check its files against that (else its marker), keep its parts."""
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            self._pending[key] = self._pool.submit(self._settle, key, committed)

    def _settle(self, key: str, committed: Mapping[str, Mapping] | None) -> None:
        """Check trial ``key``, then keep its parts (while there is room), or that it passed."""
        try:
            tables = self._check(key, committed)
        except Exception:  # noqa: BLE001 - unreadable now: left to the final check
            tables = None
        with self._lock:
            self._pending.pop(key, None)
            if tables is not None:
                keep = self._kept < KEEP_PARTS
                self._verified[key] = tables if keep else NO_PARTS
                self._kept += keep

    def _check(self, key: str, committed: Mapping[str, Mapping] | None) -> dict[str, bytes] | None:
        if committed is None:
            tables: dict[str, bytes] = {}
            state = _check_markers(self.campaign_dir, {key: marker_path(self.campaign_dir, key)}, tables)
            return tables if key in state.finished else None
        problems, tables = _listed_problems(self.campaign_dir, committed, keep_tables=True)
        return None if problems else tables

    def wait(self, keys: Iterable[str]) -> set[str]:
        """Wait for the checks of ``keys``; those whose commit checked out."""
        with self._lock:
            checks = [self._pending.get(k) for k in keys]
        for check in checks:
            if check is not None:
                check.exception()  # waits; _settle has run once it returns
        with self._lock:
            return {k for k in keys if k in self._verified}

    def results(self) -> dict[str, dict[str, bytes]]:
        """{key: its parts as read, or {} past KEEP_PARTS} of every trial whose commit checked
        out (waits for the checks); the others are left to the final check."""
        self._pool.shutdown(wait=True)
        with self._lock:
            return dict(self._verified)


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

AGGREGATE_ROW_GROUP = 65_536  # rows per row group of trials.parquet and bits.parquet (one group below that)
READ_BATCH = 256  # part files read at a time while aggregating (1024 held 177 MB more, no faster)
TRIAL_ORDER = [("kind", "ascending"), ("site_index", "ascending"), ("bit", "ascending"), ("seed", "ascending")]
BIT_ORDER = [("trial_key", "ascending"), ("bit", "ascending")]


def _part_names(campaign_dir: Path | str, role: str, keys: set[str] | None) -> list[str]:
    """The ``role`` part files (trials or bits) of ``keys`` (all: None), by relative path, in listing order."""
    folder = storage.join(campaign_dir, PARTS_DIR, role)
    return [f"{PARTS_DIR}/{role}/{n}" for n in storage.list_names(folder, ".parquet")
            if keys is None or n[: -len(".parquet")] in keys]


def _read_part_file(loc: Path | str, schema: pa.Schema, columns: list[str] | None) -> pa.Table:
    """One part file as ``schema`` (``columns`` of it only): a local file that has exactly the
    schema's fields through the single-file reader (about twice as fast, which a million-trial
    aggregation feels), any other through the dataset reader, which fills the columns an older
    version did not write."""
    if not storage.is_uri(loc):
        handle = pq.ParquetFile(loc)
        if handle.schema_arrow.equals(schema):
            return handle.read(columns=columns).replace_schema_metadata(schema.metadata)
    return storage.read_table(loc, schema=schema, columns=columns)


def _read_parts(campaign_dir: Path | str, names: list[str], schema: pa.Schema,
                read: Mapping[str, bytes | pa.Table], columns: list[str] | None = None) -> list[pa.Table]:
    """The part files ``names`` as tables (``columns`` only, or all); those in ``read`` were read already."""
    def part(name: str) -> pa.Table:
        if name in read:
            table = _part_table(name, read[name])
            return table if columns is None else table.select(columns)
        return _read_part_file(storage.join(campaign_dir, name), schema, columns)

    return storage.map_io(part, names, campaign_dir)


def _stream_sorted(campaign_dir: Path | str, names: list[str], schema: pa.Schema, order: list[tuple[str, str]],
                   read: Mapping[str, bytes | pa.Table], destination: Path | str,
                   summary: tuple[str, ...] = ()) -> tuple[pa.Table, pa.Table | None]:
    """Write the rows of the part files ``names`` to ``destination``, as one parquet file sorted
    (stably, in listing order) by ``order``, without holding them all: a first pass reads only
    the sort columns, a second writes row groups of AGGREGATE_ROW_GROUP rows. Returns the sort
    and ``summary`` columns of the rows written, in their order, and the rows themselves when
    they fit one row group (else None). The same bytes as sorting the concatenated parts and
    writing them at once, below AGGREGATE_ROW_GROUP rows."""
    keep = list(dict.fromkeys([name for name, _ in order] + list(summary)))
    columns: list[pa.Table] = []  # one compact table per batch of files
    files, rows = [], []  # (file, row) of each row, in listing order
    for start in range(0, len(names), READ_BATCH):
        tables = _read_parts(campaign_dir, names[start:start + READ_BATCH], schema, read, columns=keep)
        columns.append(pa.concat_tables(tables).combine_chunks())
        for index, table in enumerate(tables, start):
            files.append(np.full(table.num_rows, index, dtype=np.int64))
            rows.append(np.arange(table.num_rows, dtype=np.int64))
    keys = pa.concat_tables(columns) if columns else schema.empty_table().select(keep)
    files, rows = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (files, rows))
    indices = pc.sort_indices(keys, sort_keys=order).to_numpy()  # stable: ties keep the listing order
    if not len(indices):
        atomic_write_table(schema.empty_table(), destination)
        return keys, schema.empty_table()
    with _parquet_out(destination, schema) as writer:
        buffered: list[pa.Table] = []
        count = 0
        for start in range(0, len(indices), READ_BATCH):
            chosen = indices[start:start + READ_BATCH]
            wanted = list(dict.fromkeys(files[chosen].tolist()))
            tables = _read_parts(campaign_dir, [names[f] for f in wanted], schema, read)
            offsets = dict(zip(wanted, np.cumsum([0] + [t.num_rows for t in tables[:-1]]).tolist()))
            batch = pa.concat_tables(tables).take([offsets[f] + r for f, r in zip(files[chosen].tolist(),
                                                                                 rows[chosen].tolist())])
            buffered.append(batch.combine_chunks())
            count += batch.num_rows
            if count >= AGGREGATE_ROW_GROUP:
                whole = pa.concat_tables(buffered).combine_chunks()
                writer.write_table(whole.slice(0, AGGREGATE_ROW_GROUP), row_group_size=AGGREGATE_ROW_GROUP)
                buffered, count = [whole.slice(AGGREGATE_ROW_GROUP)], count - AGGREGATE_ROW_GROUP
        last = pa.concat_tables(buffered).combine_chunks() if count else None
        if count:
            writer.write_table(last, row_group_size=AGGREGATE_ROW_GROUP)
    return keys.take(indices), last if count == len(indices) else None


@contextlib.contextmanager
def _parquet_out(destination: Path | str, schema: pa.Schema):
    """A ParquetWriter whose file replaces ``destination`` whole once it is closed without error:
    a local temporary file renamed (or, on an object store, uploaded) then."""
    if storage.is_uri(destination):
        folder = Path(tempfile.gettempdir())
    else:
        folder = Path(destination).parent
        folder.mkdir(parents=True, exist_ok=True)
    spool = folder / f".{storage.name(destination)}.{uuid.uuid4().hex}.tmp"
    try:
        with pq.ParquetWriter(str(spool), schema) as writer:
            yield writer
        if storage.is_uri(destination):
            fs, path = storage.resolve(destination)
            pafs.copy_files(str(spool), path, destination_filesystem=fs)
        else:
            os.replace(spool, destination)
    finally:
        spool.unlink(missing_ok=True)


def write_aggregates(campaign_dir: str | Path, keys: Iterable[str], *,
                     _read: Mapping[str, bytes | pa.Table] | None = None) -> tuple[pa.Table, pa.Table | None]:
    """Stream the finished trials ``keys`` into trials.parquet and bits.parquet, sorted by kind,
    site, bit and seed (bits: by trial key and bit), in bounded memory. Returns the trials'
    sort columns, trial_key and images, in file order (a small table), and the trial rows when
    they fit one row group (else None)."""
    campaign_dir = _campaign_location(campaign_dir)
    wanted, read = set(keys), _read or {}
    trials, rows = _stream_sorted(campaign_dir, _part_names(campaign_dir, "trials", wanted), TRIAL_SCHEMA, TRIAL_ORDER, read,
                            storage.join(campaign_dir, TRIALS_FILE), summary=("trial_key", "images"))
    done = set(trials.column("trial_key").to_pylist())
    _stream_sorted(campaign_dir, _part_names(campaign_dir, "bits", done), BIT_SCHEMA, BIT_ORDER, read,
                   storage.join(campaign_dir, BITS_FILE))
    return trials, rows


def aggregate(campaign_dir: str | Path, keys: Iterable[str] | None = None, *,
              _read: Mapping[str, bytes | pa.Table] | None = None) -> pa.Table:
    """Gather finished trials (``keys``, default: every committed and intact trial) into trials.parquet and bits.parquet,
    sorted by kind, site, bit spec and seed. Returns the trials table, read back (a campaign
    driver uses write_aggregates, which does not)."""
    campaign_dir = _campaign_location(campaign_dir)
    if keys is None:
        return check_and_aggregate(campaign_dir)[1]
    return _rows(campaign_dir, write_aggregates(campaign_dir, keys, _read=_read)[1])


def _rows(campaign_dir: Path | str, rows: pa.Table | None) -> pa.Table:
    """The aggregated trial rows: as written, or read back from trials.parquet."""
    return rows if rows is not None else storage.read_table(storage.join(campaign_dir, TRIALS_FILE), schema=TRIAL_SCHEMA)


def check_and_aggregate(campaign_dir: str | Path, keys: Iterable[str] | None = None, *,
                        verified: Mapping[str, Mapping[str, bytes]] | None = None) -> tuple[TrialCheck, pa.Table]:
    """``check_trials`` (of ``keys``, or all; ``verified`` as there), then ``aggregate`` of the
    finished ones, reading each part file once (on an object store every read is a request;
    beyond KEEP_PARTS trials twice)."""
    state, (_, rows) = check_and_write(campaign_dir, keys, verified=verified)
    return state, _rows(_campaign_location(campaign_dir), rows)


def check_and_write(campaign_dir: str | Path, keys: Iterable[str] | None = None, *,
                    verified: Mapping[str, Mapping[str, bytes]] | None = None
                    ) -> tuple[TrialCheck, tuple[pa.Table, pa.Table | None]]:
    """check_and_aggregate in bounded memory: returns the check and what write_aggregates returns."""
    read: dict[str, bytes] = {}
    state = check_trials(campaign_dir, keys, tables=read, verified=verified)
    return state, write_aggregates(campaign_dir, state.finished, _read=read)

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
