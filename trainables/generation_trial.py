"""One generation trial of a campaign (kind x site x bit x seed [x decode step]) over a prompts:
data set: the generation counterpart of trainables.trial.run_trial, written without Ray.

The prompts, the model and their golden greedy continuation (trainables.inject.generation.
prepare_generation) are built once per worker process and reused by every trial it runs. Prompts
are processed in windows of ``report_every``; faults start from the cached golden state
(``settings.prefix``, the default) and give the same tokens as decoding from the prompt.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from trainables import hardware, results
from trainables.digests import changed_inputs, input_digests
from trainables.inject import generation
from trainables.inject.faults import parse_bit_spec
from trainables.results import uncommit_trial, write_trial
from trainables.stats import wilson_interval
from trainables.zoo import memory
from trainables.zoo.models import load_model

TRIAL_KIND = "generation"
KV_SITE_TYPE = "KVCache"  # the site_type of KV-cache sites (their site_name says which layer and tensor)

_BENCH: dict[tuple, tuple[generation.GenerationBench, str]] = {}


def digest_data(prompts) -> SimpleNamespace:
    """The prompts as the (images, labels) pair trainables.digests hashes: every token id, and the
    prompts' lengths (so that the same tokens cut differently differ)."""
    ids = prompts.token_ids
    return SimpleNamespace(images=torch.cat([t.to(torch.int64) for t in ids]) if ids else torch.zeros(0, dtype=torch.int64),
                           labels=torch.tensor([len(t) for t in ids], dtype=torch.int64))


def golden_digest(bench: generation.GenerationBench) -> str:
    """SHA-256 of the golden continuations and their non-finite flags: differs where machines decode differently."""
    digest = hashlib.sha256(np.ascontiguousarray(bench.golden).tobytes())
    digest.update(np.ascontiguousarray(bench.golden_nonfinite).tobytes())
    return digest.hexdigest()


def trial_steps(kind: str, step: int | str | None):
    """A trial's ``steps`` argument of run_generation: [s] for a listed step, "random", "prefill", None."""
    if kind in ("weight", "param"):
        return None
    return [int(step)] if isinstance(step, int) or str(step).isdigit() else step


def workbench(settings, device: torch.device) -> tuple[generation.GenerationBench, str]:
    """The per-process cached prompts, model and golden generation; (bench, golden digest)."""
    key = (settings.model, settings.dataset, settings.hub_dir, settings.hub_ref, settings.weights, settings.data_root,
           settings.images, settings.mode, settings.batch_size, str(device), settings.model_args, settings.new_tokens)
    if key not in _BENCH:
        _BENCH.clear()  # one model per worker: bound the memory
        prompts = memory.load_data(settings.dataset, root=settings.data_root, limit=settings.images, model=settings.model)
        model_args = json.loads(settings.model_args) if settings.model_args else None
        model = load_model(settings.model, hub_dir=settings.hub_dir, hub_ref=settings.hub_ref, weights=settings.weights,
                           model_args=model_args)
        if settings.inputs:  # a worker must run on what the campaign was planned with
            actual = input_digests(settings.model, settings.weights, settings.hub_dir, settings.hub_ref,
                                   digest_data(prompts), model, model_args)
            changed = changed_inputs(settings.inputs, actual)
            if changed:
                raise ValueError(f"inputs changed since the campaign was planned ({'; '.join(changed)}): "
                                 f"restore them, or start a new campaign")
        bench = generation.prepare_generation(model, prompts.token_ids, settings.new_tokens, settings.mode,
                                              settings.batch_size, device)
        _BENCH[key] = (bench, golden_digest(bench))
    return _BENCH[key]


def _concat(parts: list[generation.GenerationRecords]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([getattr(p, name) for p in parts]) for name in parts[0].as_dict()}


def _divergence_sums(first: np.ndarray) -> tuple[float, float]:
    """Sum and sum of squares of the first diverging positions of the changed faults (first >= 0)."""
    changed = first[first >= 0].astype(np.float64)
    return float(changed.sum()), float((changed**2).sum())


def run_generation_trial(settings, point, report: Callable[[dict], None] | None = None, assigned_gpus=()) -> dict:
    """Run one generation trial over every prompt, write its parquet files under its key, return its row."""
    from trainables.trial import pick_device

    started = time.time()
    uncommitted = uncommit_trial(settings.directory, point.key)
    device, device_label = pick_device(list(assigned_gpus))
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    bench, digest = workbench(settings, device)
    site = bench.site(point.kind, point.site)
    if site is None:
        raise ValueError(f"{point.kind} site {point.site} does not exist in {settings.model}")
    bit = parse_bit_spec(point.bit)
    steps = trial_steps(point.kind, point.step)
    counts, parts, paths = None, [], set()
    n = bench.num_prompts
    t0 = time.perf_counter()
    for start in range(0, n, settings.report_every):
        stop = min(start + settings.report_every, n)
        # every fault's record is kept: the first-divergence sums and per-bit rows come from them
        outcome = generation.run_generation(bench, site, point.kind, bit, point.seed, steps, start, stop, 1, "all",
                                            point.fault, settings.prefix)
        counts = outcome.counts if counts is None else counts + outcome.counts
        parts.append(outcome.records)
        paths.add(outcome.path)
        low, high = wilson_interval(counts.sdc, counts.faults)
        metrics = {"trial_key": point.key, "images": counts.faults, "sdc": counts.sdc, "sdc_rate": counts.sdc_rate,
                   "ci_low": low, "ci_high": high,
                   "inj_per_s": counts.faults / max(time.perf_counter() - t0, 1e-9)}
        if report is not None and stop < n:
            report(metrics)
    records = _concat(parts)
    row = _trial_row(settings, point, site, bit, counts, records, started, device_label, bench, digest, paths)
    bit_rows = _bit_rows(settings.name, point.key, records)
    write_trial(settings.directory, row, bit_rows, _fault_columns(settings, point, site, records),
                uncommitted=uncommitted,
                while_writing=None if report is None else lambda c: report({**metrics, "commit": json.dumps(c)}))
    return row


def _site_columns(kind: str, site) -> dict:
    kv = kind == "kv"
    return {"site_index": site.index, "site_name": site.name,
            "site_call": None if kind in ("param", "kv") else site.call,
            "site_type": KV_SITE_TYPE if kv else site.module_type,
            "site_output_index": getattr(site, "output_index", None)}


def _trial_row(settings, point, site, bit, counts: generation.GenerationCounts, records: dict, started: float,
               device_label: str, bench, digest: str, paths: set) -> dict:
    """A generation trial's row: the common columns, the counts and sums (reducible across trials),
    per-step counts, and their rates; ci_low/ci_high: the Wilson 95% interval of sdc_rate."""
    faults = counts.faults
    rate = (lambda k: k / faults if faults else float("nan"))  # noqa: E731
    changed = faults - counts.identical
    masked = faults - counts.sdc - counts.nonfinite
    first_sum, first_sq = _divergence_sums(records["first_divergence"])
    low, high = wilson_interval(counts.sdc, faults)
    row = {
        "campaign": settings.name, "trial_key": point.key, "model": settings.model, "dataset": settings.dataset,
        "synthetic": False, "mode": settings.mode, "kind": point.kind, **_site_columns(point.kind, site),
        "bit_spec": str(bit), "bit": bit if isinstance(bit, int) else -1, "seed": point.seed,
        "images_per_weight_fault": 1 if point.kind in ("weight", "param") else None,  # prompts per weight fault
        "batch_size": settings.batch_size, "images": faults, "golden_correct": 0, "mismatches": 0,
        "changed": changed, "nonfinite": counts.nonfinite, "sdc": counts.sdc, "masked": masked, "effective": counts.effective,
        "sdc_rate": rate(counts.sdc), "nonfinite_rate": rate(counts.nonfinite), "masked_rate": rate(masked),
        "changed_rate": rate(changed), "ci_low": low, "ci_high": high, "stopped_early": False,
        "wall_s": time.time() - started, "device": device_label, "hardware": hardware.describe(bench.device, settings.mode),
        "torch_version": torch.__version__, "golden_digest": digest, "started_at": started,
        "worker": f"{socket.gethostname()}:{os.getpid()}", "path": paths.pop() if len(paths) == 1 else "mixed",
        "fault": str(point.fault), "weight_format": None,
        "trial_kind": TRIAL_KIND, "new_tokens": bench.new_tokens,
        "decode_step": None if point.step is None else str(point.step), "identical": counts.identical,
        "first_divergence_sum": first_sum, "first_divergence_sq_sum": first_sq,
        "edit_distance_sum": counts.edit_sum, "edit_distance_sq_sum": counts.edit_sq_sum,
        "identical_rate": rate(counts.identical), "mean_first_divergence": first_sum / changed if changed else float("nan"),
        "mean_edit_distance": rate(counts.edit_sum),
        **{name: counts.by_step[i].astype(int).tolist() for i, name in enumerate(results.GEN_STEP_COLUMNS)},
    }
    return {name: row.get(name) for name in results.TRIAL_SCHEMA.names}  # classification/next-token columns: null


def _bit_rows(campaign: str, key: str, records: dict) -> list[dict]:
    """Per first flipped bit: faults, changed, identical, SDC, non-finite, effective and the sums."""
    rows = []
    for b in np.unique(records["bit"]).tolist():
        at = records["bit"] == b
        identical, nonfinite = records["identical"][at], records["nonfinite"][at]
        first_sum, first_sq = _divergence_sums(records["first_divergence"][at])
        edit = records["edit_distance"][at]
        row = {"campaign": campaign, "trial_key": key, "bit": int(b), "images": int(at.sum()), "golden_correct": 0,
               "mismatches": 0, "changed": int((~identical).sum()), "nonfinite": int(nonfinite.sum()),
               "sdc": int((~identical & ~nonfinite).sum()), "effective": int(records["effective"][at].sum()),
               "identical": int(identical.sum()), "first_divergence_sum": first_sum, "first_divergence_sq_sum": first_sq,
               "edit_distance_sum": float(edit.sum()), "edit_distance_sq_sum": float((edit**2).sum())}
        rows.append({name: row.get(name) for name in results.BIT_SCHEMA.names})
    return rows


def _fault_columns(settings, point, site, records: dict) -> dict | None:
    """The per-fault rows --record keeps (changed: a changed continuation or non-finite logits, as
    GenerationRecords); image = the prompt."""
    if settings.record == "none":
        return None
    keep = np.ones(len(records["prompt"]), dtype=bool) if settings.record == "all" else (
        ~records["identical"] | records["nonfinite"])
    r = {name: value[keep] for name, value in records.items()}
    n = int(keep.sum())
    outcome = np.where(r["nonfinite"], "nonfinite", np.where(~r["identical"], "sdc", "masked"))
    columns = {"campaign": [settings.name] * n, "trial_key": [point.key] * n, "kind": [point.kind] * n,
               "site_index": np.full(n, site.index), "site_name": [site.name] * n, "seed": np.full(n, point.seed),
               "image": r["prompt"], "golden_correct": np.zeros(n, dtype=bool), "changed": ~r["identical"],
               "nonfinite": r["nonfinite"], "outcome": outcome, "position": r["position"], "fault_group": r["fault_group"],
               "bit": r["bit"], "raw_before": r["raw_before"], "value_before": r["value_before"],
               "value_after": r["value_after"], "fault": [str(point.fault)] * n, "effective": r["effective"],
               "step": r["step"], "kv_position": r["kv_position"], "first_divergence": r["first_divergence"],
               "edit_distance": r["edit_distance"]}
    return {name: columns.get(name, [None] * n) for name in results.FAULT_SCHEMA.names}
