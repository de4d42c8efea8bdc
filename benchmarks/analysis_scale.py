"""Peak memory of `report` on a large campaign: the tables pooled batch by batch (analysis.stream)
against the whole frames (analysis.load / load_bits), side by side, each in its own process.

It synthesizes a campaign directory with the real schemas (trainables.results): --rows trials of
demo:vgg's 17 neuron sites x bits 0-31 x seeds (one fixed bit each, so one per-bit row each),
written in row groups of 65,536 sorted as the campaign writes them, with deterministic counts.
Then it runs analysis.report.run on it twice: as it is, and with the bounded path turned off
(the whole frames, as before). It prints each run's peak RSS and seconds and whether the two
reports are identical (text and every CSV).

    python benchmarks/analysis_scale.py                  # 1,000,000 trials
    python benchmarks/analysis_scale.py --rows 200000

The synthetic campaign has no commit markers, so both runs skip report's completeness check
(which reads each marker) and take every aggregated trial as verified.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SITES = [(0, "input", "Identity"), *[(i, f"features.{i - 1}", t) for i, t in enumerate(
    ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d",
     "BatchNorm2d", "ReLU", "AdaptiveAvgPool2d", "Flatten", "Linear", "ReLU", "Linear"], start=1)]]


def synthesize(directory: Path, rows: int) -> None:
    """trials.parquet and bits.parquet of ``rows`` trials (real schemas, the campaign's sort orders)."""
    from trainables import results as R

    seeds = -(-rows // (len(SITES) * 32))
    site, bit, seed = (a.ravel()[:rows] for a in np.meshgrid(np.arange(len(SITES)), np.arange(32), np.arange(seeds),
                                                             indexing="ij"))
    rng = np.random.default_rng(0)
    images = np.full(rows, 64, np.int64)
    golden = 58 + rng.integers(0, 4, rows)
    mismatches = np.where(bit == 30, rng.integers(20, 58, rows), rng.integers(0, 2, rows))
    nonfinite = np.where(bit == 30, rng.integers(0, 10, rows), 0)
    changed = mismatches + nonfinite
    sdc = changed - nonfinite
    keys = np.array([R.trial_key("neuron", int(s), int(b), int(e)) for s, b, e in zip(site, bit, seed)], dtype=object)
    name = np.array([SITES[s][1] for s in range(len(SITES))], dtype=object)[site]
    kind_type = np.array([SITES[s][2] for s in range(len(SITES))], dtype=object)[site]
    columns = {
        "campaign": "scale", "trial_key": keys, "model": "demo:vgg", "dataset": "fashion-mnist", "synthetic": False,
        "mode": "fp32", "kind": "neuron", "site_index": site, "site_name": name, "site_call": 0, "site_type": kind_type,
        "bit_spec": bit.astype(str), "bit": bit, "seed": seed, "images_per_weight_fault": 64, "batch_size": 64,
        "images": images, "golden_correct": golden, "mismatches": mismatches, "changed": changed, "nonfinite": nonfinite,
        "sdc": sdc, "masked": images - sdc - nonfinite, "failures": mismatches, "misclassification_rate": mismatches / golden,
        "sdc_rate": sdc / images, "nonfinite_rate": nonfinite / images, "masked_rate": (images - sdc - nonfinite) / images,
        "failure_rate": mismatches / golden, "ci_low": 0.0, "ci_high": 1.0, "stopped_early": False, "wall_s": 0.05,
        "device": "cpu", "hardware": "synthetic CPU", "torch_version": "2.14.1", "golden_digest": "0" * 64,
        "started_at": 0.0, "worker": "node:1", "path": "prefix", "effective": images,
    }
    trials = _table(columns, R.TRIAL_SCHEMA, rows)
    _write(trials.sort_by(R.TRIAL_ORDER), directory / R.TRIALS_FILE, R.AGGREGATE_ROW_GROUP)
    bit_columns = {c: columns[c] for c in ("campaign", "trial_key", "bit", "images", "golden_correct", "mismatches",
                                           "changed", "nonfinite", "sdc", "failures", "effective")}
    _write(_table(bit_columns, R.BIT_SCHEMA, rows).sort_by(R.BIT_ORDER), directory / R.BITS_FILE, R.AGGREGATE_ROW_GROUP)
    R.write_spec(directory, {"name": "scale", "num_trials": rows, "seeds": list(range(seeds))})


def _table(columns: dict, schema: pa.Schema, rows: int) -> pa.Table:
    arrays = []
    for field in schema:
        value = columns.get(field.name)
        if value is None:
            arrays.append(pa.nulls(rows, field.type))
        elif np.ndim(value) == 0:
            arrays.append(pa.array(np.full(rows, value, dtype=object if isinstance(value, str) else None), field.type))
        else:
            arrays.append(pa.array(value, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _write(table: pa.Table, path: Path, row_group: int) -> None:
    with pq.ParquetWriter(str(path), table.schema) as writer:
        writer.write_table(table, row_group_size=row_group)


def report_once(directory: str, out: str, whole: bool) -> dict:
    """analysis.report.run in this process (``whole``: with the bounded path off)."""
    from analysis import report, stream

    report._verified = lambda paths: ([], {})  # no commit markers in a synthetic campaign: take every trial
    if whole:
        stream.pooled = lambda *args, **kwargs: None
    started = time.monotonic()
    text = report.run([directory], out)
    return {"path": "whole frames (before)" if whole else "pooled batch by batch", "seconds": round(time.monotonic() - started, 1),
            "peak_rss_mb": round(own_peak_rss() / 2**20), "text": text}


def own_peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM: unlike ru_maxrss, not the parent's peak before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="trials (and per-bit rows) to synthesize")
    parser.add_argument("--keep", help="synthesize into (and keep) this folder")
    parser.add_argument("--one", nargs=3, metavar=("DIR", "OUT", "MODE"), help=argparse.SUPPRESS)  # one run, here
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(report_once(args.one[0], args.one[1], args.one[2] == "whole")))
        return 0
    work = Path(args.keep or tempfile.mkdtemp(prefix="analysis-scale-"))
    directory = work / "scale"
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    synthesize(directory, args.rows)
    print(f"synthesized {args.rows:,} trials and per-bit rows in {time.monotonic() - started:.1f} s: "
          f"{(directory / 'trials.parquet').stat().st_size / 2**20:.1f} MB + {(directory / 'bits.parquet').stat().st_size / 2**20:.1f} MB",
          flush=True)
    runs = []
    for mode in ("pooled", "whole"):
        out = work / f"report-{mode}"
        done = subprocess.run([sys.executable, __file__, "--one", str(directory), str(out), mode], cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{mode}: report failed:\n{done.stderr[-3000:]}")
        runs.append({**json.loads(done.stdout.strip().splitlines()[-1]), "out": out})
    pooled, whole = runs
    same_text = pooled["text"].replace(str(pooled["out"]), "OUT") == whole["text"].replace(str(whole["out"]), "OUT")
    csvs = sorted(p.name for p in pooled["out"].glob("*.csv"))
    same_files = csvs == sorted(p.name for p in whole["out"].glob("*.csv")) and all(
        (pooled["out"] / n).read_bytes() == (whole["out"] / n).read_bytes() for n in csvs)
    print(f"| report of {args.rows:,} trials | seconds | peak RSS |\n|---|---|---|")
    for r in (whole, pooled):
        print(f"| {r['path']} | {r['seconds']} | {r['peak_rss_mb']:,} MB |")
    print(f"identical text: {same_text}; identical CSVs ({len(csvs)}): {same_files}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same_text and same_files else 1


if __name__ == "__main__":
    sys.exit(main())
