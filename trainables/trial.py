"""One campaign trial = (seed, site, bit) over a data set: the function a Ray Tune worker
runs, written without Ray so it can be driven directly (tests, GPU checks).

Model, data and golden predictions are loaded once per worker process and reused by every
trial that process runs (Tune's ``reuse_actors``). Images are processed in windows of
``report_every`` (independent of batch size): after each, running counts are reported (the
last window's with what the trial's commit lists, while its files are written) and an
optional ``target_margin`` on the interval's half-width stops the trial early: the anytime-valid
confidence sequence (trainables.sfi, ``stop_interval="cs"``, what campaign specs use) or, as
before, the Wilson 95% interval checked at every window (``"wilson"``, this class's default). A
trial of a campaign stopping per stratum stops on the stratum's pooled counts (``prior_k/n``).
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch

from trainables import hardware
from trainables import sfi
from trainables.digests import changed_inputs, input_digests
from trainables.inject import engine, proportional, protection, tokens
from trainables.inject.faults import parse_bit_spec
from trainables import results
from trainables.results import trial_key, uncommit_trial, write_trial
from trainables.stats import wilson_interval
from trainables.zoo import memory, quantization
from trainables.zoo.models import load_model

_WORKBENCH: dict[tuple, tuple[engine.Workbench, bool]] = {}


@dataclass(frozen=True)
class CampaignSettings:
    """What every trial of a campaign shares (the resolved spec, as the trials see it)."""

    name: str
    directory: str
    model: str
    dataset: str
    hub_dir: str | None = None
    hub_ref: str | None = None
    weights: str | None = None
    data_root: str | None = None
    images: int | None = None
    mode: str = "fp32"
    batch_size: int = 256
    images_per_weight_fault: int = engine.DEFAULT_IMAGES_PER_WEIGHT_FAULT
    record: str = "changed"
    target_margin: float | None = None
    report_every: int = 2048
    stop_interval: str = "wilson"  # what target_margin stops on: "cs" (anytime-valid) or "wilson" (repeated checks)
    confidence: float = 0.95  # the confidence sequence's level
    cpus_per_trial: float = 1.0
    prefix: bool = True  # prefix reuse (same results; see trainables.inject.suffix)
    prefix_cache_mb: float | None = None  # its cache budget per worker; None: a quarter of free memory
    inputs: dict | None = None  # content digests the driver planned with (trainables.digests); checked on load
    protect: str | None = None  # the protection spec of a paired campaign (trainables.inject.protection)
    protection: dict | None = None  # its guard record: protected sites and their bounds
    weight_format: str | None = None  # fp8 weight storage (fp8_e4m3fn, fp8_e5m2); mode "int8": a quantized model
    transform: str | None = None  # the data set's preprocessing (trainables.zoo.datasets)
    input_column: str | None = None
    label_column: str | None = None
    data_cache: str | None = None  # image sources: memory-mapped from this node's cache, prepared once per node
    model_args: str | None = None  # the model's keyword arguments as sorted JSON text (hashable)
    site_pool: dict | None = None  # kind -> site indices a proportional trial (site -1) draws from
    seq_len: int | None = None  # text data for a causal LM: tokens per sequence; None: the model's context
    new_tokens: int | None = None  # a generation campaign (prompts: data): tokens decoded per prompt; None: none

    @classmethod
    def from_dict(cls, values: dict) -> "CampaignSettings":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class TrialPoint:
    kind: str
    site: int
    bit: int | str  # an LSB-0 bit index or "random"
    seed: int
    fault: str = "flip"  # the fault model (trainables.inject.fault_models); in the key unless flip
    prior_k: int = 0  # mismatches and golden-correct images its stratum counted in earlier rounds (--margin):
    prior_n: int = 0  # the trial stops once the stratum's pooled interval is narrow enough
    limit: int = 0  # run only the first this many images (--allocate's share of a stratum); 0: all
    step: int | str | None = None  # generation trials of neuron and kv sites: a decode step, "random" or "prefill"

    @property
    def key(self) -> str:
        return trial_key(self.kind, self.site, self.bit, self.seed, self.fault, self.step)


def pick_device(assigned_gpus) -> tuple[torch.device, str]:
    """The trial's device and how its row describes it; Ray's CUDA_VISIBLE_DEVICES makes
    the assigned GPU cuda:0 in this process."""
    if assigned_gpus and torch.cuda.is_available():
        return torch.device("cuda", 0), f"cuda ({torch.cuda.get_device_name(0)}; Ray GPU {','.join(map(str, assigned_gpus))})"
    if assigned_gpus:
        return torch.device("cpu"), f"cpu (CUDA absent; Ray assigned GPU {','.join(map(str, assigned_gpus))})"
    return torch.device("cpu"), "cpu"


def workbench(settings: CampaignSettings, device: torch.device) -> tuple[engine.Workbench, bool]:
    """The per-process cached model + data + golden pass; (bench, synthetic)."""
    key = (settings.model, settings.dataset, settings.hub_dir, settings.hub_ref, settings.weights, settings.data_root,
           settings.images, settings.mode, settings.batch_size, str(device), settings.prefix, settings.prefix_cache_mb,
           settings.weight_format, settings.transform, settings.input_column, settings.label_column, settings.data_cache,
           settings.model_args, settings.seq_len, quantization.backend() if settings.mode == "int8" else None)
    if key not in _WORKBENCH:
        _WORKBENCH.clear()  # one model per worker: bound the memory
        data = memory.load_data(settings.dataset, root=settings.data_root, limit=settings.images,
                                transform=settings.transform, input_column=settings.input_column,
                                label_column=settings.label_column, model=settings.model, cache=settings.data_cache,
                                seq_len=settings.seq_len)
        model_args = json.loads(settings.model_args) if settings.model_args else None
        model = load_model(settings.model, num_classes=data.model_classes, hub_dir=settings.hub_dir,
                           hub_ref=settings.hub_ref, weights=settings.weights, model_args=model_args)
        if settings.inputs:  # a worker must run on what the campaign was planned with
            actual = input_digests(settings.model, settings.weights, settings.hub_dir, settings.hub_ref, data, model,
                                   model_args)
            changed = changed_inputs(settings.inputs, actual)
            if changed:
                raise ValueError(f"inputs changed since the campaign was planned ({'; '.join(changed)}): "
                                 f"restore them, or start a new campaign")
        if settings.mode == "int8":  # calibrated on images disjoint from the evaluated ones, on the CPU
            model = quantization.quantize_int8(model, quantization.calibration_data(settings.dataset, settings.data_root),
                                               settings.model)
            device = torch.device("cpu")
        bench = engine.prepare(model, (data.images, data.labels), settings.mode, settings.batch_size, device,
                               prefix=settings.prefix, prefix_cache_mb=settings.prefix_cache_mb,
                               weight_format=settings.weight_format)
        _WORKBENCH[key] = (bench, data.synthetic)
    return _WORKBENCH[key]


def run_trial(
    settings: CampaignSettings,
    point: TrialPoint,
    report: Callable[[dict], None] | None = None,
    assigned_gpus=(),
) -> dict:
    """Run one trial, write its parquet files atomically under its key, return its row."""
    if settings.new_tokens is not None:  # a generation campaign: greedy decoding of prompts
        from trainables.generation_trial import run_generation_trial

        return run_generation_trial(settings, point, report, assigned_gpus)
    started = time.time()
    uncommitted = uncommit_trial(settings.directory, point.key)  # on a store: while the trial computes
    device, device_label = pick_device(list(assigned_gpus))
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    bench, synthetic = workbench(settings, device)
    proportional_trial = point.site == proportional.SITE
    site = proportional.pool(bench, point.kind, settings.site_pool[point.kind]) if proportional_trial else bench.site(point.kind, point.site)
    if site is None:
        raise ValueError(f"{point.kind} site {point.site} does not exist in {settings.model}")
    bit = parse_bit_spec(point.bit)
    fault = bench.check_fault(point.kind, bit, point.fault)
    lm = bench.task == tokens.TASK
    if lm and settings.protection:
        raise ValueError("protected campaigns are for classifiers; a causal LM's campaign runs unprotected")
    counts = (tokens.TokenCounts if lm else engine.Counts).zeros(bench.width_for(point.kind))
    guarded = protection.bench_for(bench, settings.protection)  # None unless the campaign is protected
    pairs = protection.PairCounts.zeros(bench.width_for(point.kind)) if guarded is not None else None
    run = proportional.run_faults if proportional_trial else engine.run_faults if guarded is None else protection.paired_runner(guarded)
    record_parts = []
    paths = set()
    stopped_early = False
    n = min(bench.num_images, point.limit) if point.limit else bench.num_images
    t0 = time.perf_counter()
    for start in range(0, n, settings.report_every):
        stop = min(start + settings.report_every, n)
        outcome = run(bench, site, point.kind, bit, point.seed, start, stop,
                      settings.images_per_weight_fault, settings.record, fault=fault)
        counts = counts + outcome.counts
        if pairs is not None:
            pairs = pairs + outcome.pairs
        paths.add(outcome.path)
        if outcome.records is not None:
            record_parts.append(outcome.records)
        k_n = _proportion(counts)
        low, high = _interval(settings, *k_n)
        metrics = _metrics(point, counts, low, high, time.perf_counter() - t0)
        if settings.target_margin and stop < n:
            pooled = (low, high) if not point.prior_n else _interval(
                settings, k_n[0] + point.prior_k, k_n[1] + point.prior_n)
            if (pooled[1] - pooled[0]) / 2 < settings.target_margin:
                stopped_early = True
                break
        if report is not None and stop < n:
            report(metrics)
    low, high = _interval(settings, *_proportion(counts))
    if lm:
        row = _next_token_row(settings, point, site, bit, fault, counts, low, high, stopped_early, started, device_label,
                              bench, paths, synthetic)
        bit_rows = [_next_token_bit_row(settings.name, point.key, counts, b) for b in np.nonzero(counts.by_bit[0])[0].tolist()]
        write_trial(settings.directory, row, bit_rows,
                    _fault_columns(settings.name, point, site, str(fault), record_parts, tokens.TRIAL_KIND),
                    uncommitted=uncommitted,
                    while_writing=None if report is None else lambda c: report({**metrics, "commit": json.dumps(c)}))
        return row
    row = {
        "campaign": settings.name, "trial_key": point.key, "model": settings.model, "dataset": settings.dataset,
        "synthetic": synthetic, "mode": settings.mode, "kind": point.kind, "site_index": site.index,
        "site_name": site.name, "site_call": None if point.kind in ("param", "qparam") else site.call, "site_type": site.module_type,
        "site_output_index": getattr(site, "output_index", None), "bit_spec": str(bit),
        "bit": bit if isinstance(bit, int) else -1, "seed": point.seed,  # -1: random bit or a bit pool
        "images_per_weight_fault": settings.images_per_weight_fault if point.kind != "neuron" else None,
        "batch_size": settings.batch_size, "images": counts.images, "golden_correct": counts.golden_correct,
        "mismatches": counts.mismatches, "changed": counts.total("changed"), "nonfinite": counts.total("nonfinite"),
        "sdc": counts.total("sdc"), "masked": counts.masked, "failures": counts.total("failures"),
        "misclassification_rate": counts.misclassification_rate, "sdc_rate": counts.sdc_rate,
        "nonfinite_rate": counts.nonfinite_rate, "masked_rate": counts.masked_rate, "failure_rate": counts.failure_rate, "ci_low": low, "ci_high": high, "stopped_early": stopped_early,
        "wall_s": time.time() - started, "device": device_label, "hardware": hardware.describe(bench.device, settings.mode),
        "torch_version": torch.__version__, "golden_digest": bench.golden_digest,
        "started_at": started, "worker": f"{socket.gethostname()}:{os.getpid()}",
        "path": paths.pop() if len(paths) == 1 else "mixed",
        "fault": str(fault), "effective": counts.total("effective"),
        "weight_format": settings.weight_format,  # fp8 weight storage (every row of the campaign); null: none
    }
    row.update(protection.row_columns(settings.protect, pairs, counts.golden_correct))
    row.update({name: None for name, _ in results.TOKEN_TRIAL_FIELDS + results.GEN_TRIAL_FIELDS})  # a classification
    # trial: no next-token or generation columns
    bit_rows = [
        {"campaign": settings.name, "trial_key": point.key, "bit": b,
         **{name: int(counts.by_bit[i, b]) for i, name in enumerate(engine.COUNT_FIELDS)}}
        for b in np.nonzero(counts.by_bit[0])[0].tolist()
    ]
    for bit_row in bit_rows:
        bit_row.update(protection.bit_columns(pairs, bit_row["bit"]))
        bit_row.update({name: None for name, _ in results.TOKEN_BIT_FIELDS + results.GEN_BIT_FIELDS})
    # the last window's counts are reported with what the commit lists, while the files are written
    write_trial(settings.directory, row, bit_rows, _fault_columns(settings.name, point, site, str(fault), record_parts),
                uncommitted=uncommitted,
                while_writing=None if report is None else lambda c: report({**metrics, "commit": json.dumps(c)}))
    return row


def _proportion(counts) -> tuple[int, int]:
    """(k, n) of a trial's headline rate: mismatches / golden-correct images (classification),
    silent corruptions / sequences (next-token)."""
    if isinstance(counts, tokens.TokenCounts):
        return counts.total("sdc"), counts.sequences
    return counts.mismatches, counts.golden_correct


def _common_row(settings: CampaignSettings, point: TrialPoint, site, bit, fault, started: float, device_label: str,
                bench, paths: set, synthetic: bool) -> dict:
    return {
        "campaign": settings.name, "trial_key": point.key, "model": settings.model, "dataset": settings.dataset,
        "synthetic": synthetic, "mode": settings.mode, "kind": point.kind, "site_index": site.index,
        "site_name": site.name, "site_call": None if point.kind in ("param", "qparam") else site.call,
        "site_type": site.module_type, "site_output_index": getattr(site, "output_index", None), "bit_spec": str(bit),
        "bit": bit if isinstance(bit, int) else -1, "seed": point.seed,
        "images_per_weight_fault": settings.images_per_weight_fault if point.kind != "neuron" else None,
        "batch_size": settings.batch_size, "wall_s": time.time() - started, "device": device_label,
        "hardware": hardware.describe(bench.device, settings.mode), "torch_version": torch.__version__,
        "golden_digest": bench.golden_digest, "started_at": started, "worker": f"{socket.gethostname()}:{os.getpid()}",
        "path": paths.pop() if len(paths) == 1 else "mixed", "fault": str(fault), "weight_format": settings.weight_format,
    }


def _next_token_row(settings, point, site, bit, fault, counts: tokens.TokenCounts, low: float, high: float,
                    stopped_early: bool, started: float, device_label: str, bench, paths: set, synthetic: bool) -> dict:
    """A teacher-forced trial's row: the common columns, the next-token counts and sums (reducible
    across trials) and their rates and means; ci_low/ci_high: Wilson 95% of sdc_rate."""
    row = _common_row(settings, point, site, bit, fault, started, device_label, bench, paths, synthetic)
    masked = counts.sequences - counts.total("sdc") - counts.total("nonfinite")
    row.update({"trial_kind": tokens.TRIAL_KIND, "images": counts.sequences, "seq_len": int(bench.images.shape[1]),
                "golden_correct": 0, "mismatches": 0,  # no classification in a next-token trial
                **{name: counts.total(name) for name in tokens.COUNT_FIELDS},
                **{f"{name}_sum": counts.sum(name) for name in tokens.SUM_FIELDS},
                "masked": masked, "masked_rate": masked / counts.sequences if counts.sequences else float("nan"),
                "token_change_rate": counts.token_change_rate, "sdc_rate": counts.sdc_rate,
                "changed_rate": counts.changed_rate, "nonfinite_rate": counts.nonfinite_rate,
                "mean_log_ppl_ratio": counts.mean_log_ppl_ratio, "mean_kl": counts.mean_kl,
                "ci_low": low, "ci_high": high, "stopped_early": stopped_early})
    return {name: row.get(name) for name in results.TRIAL_SCHEMA.names}  # classification-only columns: null


def _next_token_bit_row(campaign: str, key: str, counts: tokens.TokenCounts, b: int) -> dict:
    row = {"campaign": campaign, "trial_key": key, "bit": b, "golden_correct": 0,
           "mismatches": 0, "images": int(counts.by_bit[tokens.COUNT_FIELDS.index("sequences"), b]),
           **{name: int(counts.by_bit[i, b]) for i, name in enumerate(tokens.COUNT_FIELDS)},
           **{f"{name}_sum": float(counts.sums[i, b]) for i, name in enumerate(tokens.SUM_FIELDS)}}
    return {name: row.get(name) for name in results.BIT_SCHEMA.names}


def _interval(settings: CampaignSettings, k: int, n: int) -> tuple[float, float]:
    """The trial's interval: the confidence sequence when it stops at a margin on it, else Wilson 95%."""
    if settings.target_margin and settings.stop_interval == "cs":
        return sfi.confidence_sequence(k, n, settings.confidence)
    return wilson_interval(k, n)


def _metrics(point: TrialPoint, counts, low: float, high: float, seconds: float) -> dict:
    if isinstance(counts, tokens.TokenCounts):
        return {"trial_key": point.key, "images": counts.sequences, "sequences": counts.sequences, "sdc": counts.total("sdc"),
                "sdc_rate": counts.sdc_rate, "ci_low": low, "ci_high": high,
                "inj_per_s": counts.sequences / seconds if seconds > 0 else 0.0}
    return {
        "trial_key": point.key, "images": counts.images, "golden_correct": counts.golden_correct,
        "mismatches": counts.mismatches, "misclassification_rate": counts.misclassification_rate,
        "ci_low": low, "ci_high": high, "inj_per_s": counts.images / seconds if seconds > 0 else 0.0,
    }


def _fault_columns(campaign: str, point: TrialPoint, site, fault: str, parts: list, trial_kind: str | None = None) -> dict | None:
    if not parts:
        return None
    columns = {name: np.concatenate([getattr(p, name) for p in parts]) for name in parts[0].as_dict()}
    if trial_kind is not None:  # a causal LM's faults: one per sequence, with its token position
        n = len(columns["sequence"])
        outcome = np.where(columns["nonfinite"], "nonfinite", np.where(columns["changed"], "sdc", "masked"))
        columns.update(campaign=[campaign] * n, trial_key=[point.key] * n, kind=[point.kind] * n, outcome=outcome,
                       site_index=np.full(n, site.index), site_name=[site.name] * n, seed=np.full(n, point.seed),
                       fault=[fault] * n, image=columns.pop("sequence"),
                       golden_correct=np.zeros(n, dtype=bool))  # no classification: image = the sequence
        return {name: columns.get(name, [None] * n) for name in results.FAULT_SCHEMA.names}
    n = len(columns["image"])
    outcome = np.where(columns["nonfinite"], "nonfinite", np.where(columns["changed"], "sdc", "masked"))
    columns.update(campaign=[campaign] * n, trial_key=[point.key] * n, kind=[point.kind] * n, outcome=outcome,
                   site_name=[site.name] * n, seed=np.full(n, point.seed), fault=[fault] * n)
    columns.setdefault("site_index", np.full(n, site.index))  # a proportional trial's records name each fault's site
    columns.update({name: [None] * n for name, _ in results.TOKEN_FAULT_FIELDS + results.GEN_FAULT_FIELDS})
    return protection.fault_columns(columns)
