"""The on-disk result format (torch-free): explicit, versioned pyarrow schemas and atomic
per-trial writes.

A campaign directory holds::

    spec.json             resolved spec, seeds, library versions, schema_version
    parts/trials/K.parquet  one row per finished trial K (written last: marks it done)
    parts/bits/K.parquet    per-bit outcome counts of trial K
    faults/K.parquet        per-fault rows of trial K (record level changed|all)
    trials.parquet          all trial rows, aggregated by the campaign driver
    bits.parquet            all per-bit rows, aggregated likewise

K = trial_key(kind, site, bit, seed): a re-run or retried trial replaces its own files.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

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
        ("site_call", pa.int32()),
        ("site_type", pa.string()),
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
        ("misclassification_rate", pa.float64()),
        ("sdc_rate", pa.float64()),
        ("nonfinite_rate", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("stopped_early", pa.bool_()),
        ("wall_s", pa.float64()),
        ("device", pa.string()),
        ("started_at", pa.float64()),
        ("worker", pa.string()),
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
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)

FAULT_SCHEMA = pa.schema(
    [
        ("campaign", pa.string()),
        ("trial_key", pa.string()),
        ("kind", pa.string()),
        ("site_index", pa.int32()),
        ("seed", pa.int64()),
        ("image", pa.int64()),
        ("label", pa.int64()),
        ("golden", pa.int64()),
        ("faulty", pa.int64()),
        ("golden_correct", pa.bool_()),
        ("changed", pa.bool_()),
        ("nonfinite", pa.bool_()),
        ("position", pa.int64()),
        ("fault_group", pa.int64()),
        ("bit", pa.int16()),
        ("raw_before", pa.int64()),
        ("value_before", pa.float64()),
        ("value_after", pa.float64()),
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)

TRIALS_FILE, BITS_FILE, FAULTS_DIR, PARTS_DIR, SPEC_FILE = "trials.parquet", "bits.parquet", "faults", "parts", "spec.json"

def trial_key(kind: str, site_index: int, bit_spec: str | int, seed: int) -> str:
    """Stable file-name key of one trial, e.g. 'neuron-s0005-b23-seed17' or '...-brandom-...'."""
    return f"{kind}-s{int(site_index):04d}-b{bit_spec}-seed{int(seed)}"

def atomic_write_table(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` through a temporary file and rename: readers never see
    half a file, and a rewrite replaces the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

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

def write_trial(campaign_dir: str | Path, trial_row: Mapping, bit_rows: Iterable[Mapping], fault_columns: Mapping | None) -> None:
    """Write one trial's results: faults, then per-bit counts, then the trial row (last,
    so a trial counts as done only when all its files are complete)."""
    campaign_dir = Path(campaign_dir)
    key = trial_row["trial_key"]
    faults_path = campaign_dir / FAULTS_DIR / f"{key}.parquet"
    if fault_columns is not None and len(fault_columns["image"]):
        atomic_write_table(table_from_columns(fault_columns, FAULT_SCHEMA), faults_path)
    else:
        faults_path.unlink(missing_ok=True)
    atomic_write_table(table_from_rows(bit_rows, BIT_SCHEMA), campaign_dir / PARTS_DIR / "bits" / f"{key}.parquet")
    atomic_write_table(table_from_rows([trial_row], TRIAL_SCHEMA), campaign_dir / PARTS_DIR / "trials" / f"{key}.parquet")

def finished_keys(campaign_dir: str | Path) -> set[str]:
    """Keys of the trials whose files are all written."""
    folder = Path(campaign_dir) / PARTS_DIR / "trials"
    return {p.stem for p in folder.glob("*.parquet")} if folder.is_dir() else set()

def _concat_parts(folder: Path, schema: pa.Schema, keys: set[str] | None) -> pa.Table:
    paths = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    tables = [pq.read_table(p, schema=schema) for p in paths if keys is None or p.stem in keys]
    return pa.concat_tables(tables).replace_schema_metadata(schema.metadata) if tables else schema.empty_table()

def aggregate(campaign_dir: str | Path, keys: Iterable[str] | None = None) -> pa.Table:
    """Gather finished trials (optionally only ``keys``) into trials.parquet and bits.parquet,
    sorted by kind, site, bit spec and seed. Returns the trials table."""
    campaign_dir = Path(campaign_dir)
    wanted = set(keys) if keys is not None else None
    trials = _concat_parts(campaign_dir / PARTS_DIR / "trials", TRIAL_SCHEMA, wanted)
    trials = trials.sort_by([("kind", "ascending"), ("site_index", "ascending"), ("bit", "ascending"), ("seed", "ascending")])
    done = set(trials.column("trial_key").to_pylist())
    bits = _concat_parts(campaign_dir / PARTS_DIR / "bits", BIT_SCHEMA, done)
    bits = bits.sort_by([("trial_key", "ascending"), ("bit", "ascending")])
    atomic_write_table(trials, campaign_dir / TRIALS_FILE)
    atomic_write_table(bits, campaign_dir / BITS_FILE)
    return trials

def write_spec(campaign_dir: str | Path, spec: Mapping) -> None:
    """Write spec.json atomically, stamped with the schema version."""

    path = Path(campaign_dir) / SPEC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps({**spec, "schema_version": SCHEMA_VERSION}, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def read_spec(campaign_dir: str | Path) -> dict:
    """Read spec.json; ValueError if the directory is not a campaign."""

    path = Path(campaign_dir) / SPEC_FILE
    if not path.is_file():
        raise ValueError(f"{campaign_dir} is not a campaign directory: no {SPEC_FILE}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
