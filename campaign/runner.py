"""Run a resolved campaign as Ray Tune trials, one per (seed, site, bit), then aggregate.

The parquet part files are the source of truth: a (re)run launches only the trials whose
files are missing, so ``resume`` after Ctrl-C or a killed driver, and Tune's own retries
of crashed workers, converge on the same trials.parquet and faults/ as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune
from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner
from ray.tune.logger import JsonLoggerCallback

from campaign.spec import CampaignSpec, ResolvedCampaign, SpecError, resolve
from trainables.results import SPEC_FILE, aggregate, finished_keys, read_spec, trial_key, write_spec
from trainables.trial import CampaignSettings, TrialPoint, run_trial

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CampaignOutcome:
    directory: Path
    total: int
    finished: int
    errors: tuple[str, ...]  # one line per trial that failed after its retries
    seconds: float
    injections: int

    @property
    def complete(self) -> bool:
        return self.finished == self.total

    @property
    def errored(self) -> int:
        return len(self.errors)


def _trainable(config: dict) -> None:
    """Tune's function trainable: unpack the config, run the trial, report to Tune."""
    settings = CampaignSettings.from_dict(config["campaign"])
    point = TrialPoint(**config["trial"])
    crash_dir = config["campaign"].get("_crash_once_dir")
    if crash_dir:  # test hook: kill this worker process the first time each trial runs
        marker = Path(crash_dir) / point.key
        if not marker.exists():
            marker.touch()
            os._exit(1)
    run_trial(settings, point, report=tune.report, assigned_gpus=ray.get_gpu_ids())


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for package in ("torch", "torchvision", "ray", "pytorchfi", "bitstring", "pyarrow", "pandas"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = "absent"
    return out


def check_directory(plan: ResolvedCampaign) -> None:
    """Refuse a directory that holds a different campaign, or anything else (read only)."""
    directory = plan.directory
    if (directory / SPEC_FILE).exists():
        stored = read_spec(directory).get("identity", {})
        current = json.loads(json.dumps(plan.identity()))
        differs = [k for k, v in current.items() if stored.get(k) != v]
        if differs:
            raise SpecError(f"{directory} holds a different campaign (differs in: {', '.join(differs)}); "
                            "choose another --name or --out, or `resume` it as it is")
    elif directory.exists() and any(directory.iterdir()):
        raise SpecError(f"{directory} exists and is not a campaign directory; choose another --name or --out")


def record_spec(plan: ResolvedCampaign) -> None:
    """Write spec.json: the resolved spec, seeds, sites and library versions."""
    write_spec(plan.directory, {
        "name": plan.directory.name,
        "identity": plan.identity(),
        "spec": dataclasses.asdict(plan.spec),
        "seeds": list(plan.seeds),
        "num_images": plan.num_images,
        "num_trials": len(plan.trials),
        "sites": plan.sites_by_kind,
        "site_table": plan.site_table,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def spec_from_directory(directory: str | Path, **overrides) -> CampaignSpec:
    """The spec stored in a campaign directory (seeds fixed), for ``resume``."""
    directory = Path(directory).expanduser().resolve()
    stored = read_spec(directory)
    values = dict(stored["spec"])
    values.update(out=str(directory.parent), name=directory.name, seeds=tuple(stored["seeds"]), sites=tuple(values["sites"]))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return CampaignSpec(**values)


def settings_for(plan: ResolvedCampaign) -> dict:
    s = plan.spec
    return dataclasses.asdict(CampaignSettings(
        name=plan.directory.name, directory=str(plan.directory), model=s.model, dataset=plan.dataset,
        hub_dir=s.hub_dir, hub_ref=s.hub_ref, weights=s.weights, data_root=s.data_root, images=s.images,
        mode=s.dtype, batch_size=s.batch_size, images_per_weight_fault=s.images_per_weight_fault, record=s.record,
        target_margin=s.target_margin, report_every=s.report_every, cpus_per_trial=s.cpus_per_trial,
    ))


def connect(spec: CampaignSpec) -> None:
    """Join the given or running Ray cluster, else start a local one; check it can host a trial."""
    if not ray.is_initialized():
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        in_job = "RAY_JOB_ID" in os.environ or os.environ.get("RAY_ADDRESS")
        ray.init(address=spec.address, include_dashboard=False if not in_job and not spec.address else None,
                 runtime_env=None if in_job else {"env_vars": env}, logging_level="WARNING", log_to_driver=True)
    resources = ray.cluster_resources()
    if spec.gpus_per_trial > 0 and resources.get("GPU", 0) < spec.gpus_per_trial:
        raise SpecError(f"gpus_per_trial: {spec.gpus_per_trial} requested, the Ray cluster has {resources.get('GPU', 0)} GPUs")
    if resources.get("CPU", 0) < spec.cpus_per_trial:
        raise SpecError(f"cpus_per_trial: {spec.cpus_per_trial} requested, the Ray cluster has {resources.get('CPU', 0)} CPUs")


class Progress(tune.Callback):
    """One concise line every few seconds: trials done/total, injections/s, ETA."""

    def __init__(self, total: int, already: int, images_per_trial: int, every_s: float = 5.0) -> None:
        self.total, self.done, self.images_per_trial = total, already, images_per_trial
        self.every_s = every_s
        self.start = self.last = time.monotonic()
        self.running: dict[str, int] = {}
        self.finished_images = 0
        self.errored = 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.running[trial.trial_id] = int(result.get("images", 0))
        self._maybe_print()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        self.finished_images += self.running.pop(trial.trial_id, 0)
        self._maybe_print(force=self.done == self.total)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.errored += 1
        self.running.pop(trial.trial_id, None)

    def _maybe_print(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        images = self.finished_images + sum(self.running.values())
        rate = images / max(now - self.start, 1e-9)
        remaining = (self.total - self.done) * self.images_per_trial - sum(self.running.values())
        eta = time.strftime("%H:%M:%S", time.gmtime(remaining / rate)) if rate > 0 else "?"
        errors = f", {self.errored} errored" if self.errored else ""
        print(f"[campaign] {self.done}/{self.total} trials, {rate:,.0f} inj/s, ETA {eta}{errors}", flush=True)


def run_campaign(spec: CampaignSpec, *, _crash_once_dir: str | None = None, progress_every_s: float = 5.0) -> CampaignOutcome:
    """Validate, run the missing trials on Ray Tune, aggregate the parquet files."""
    started = time.monotonic()
    plan = resolve(spec)
    check_directory(plan)
    wanted = {trial_key(t.kind, t.site, t.bit, t.seed): t for t in plan.trials}
    pending = [t for key, t in wanted.items() if key not in finished_keys(plan.directory)]
    errors: tuple[str, ...] = ()
    if pending:
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV/TensorBoard files per trial
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables, only our progress line
        connect(plan.spec)  # the last check (cluster resources) before anything is written
    record_spec(plan)
    if pending:
        settings = settings_for(plan)
        if _crash_once_dir:
            settings["_crash_once_dir"] = _crash_once_dir
        trainable = tune.with_resources(_trainable, {"cpu": plan.spec.cpus_per_trial, "gpu": plan.spec.gpus_per_trial})
        attempt = len(list((plan.directory / "ray").glob("tune-*"))) if (plan.directory / "ray").exists() else 0
        progress = Progress(len(wanted), len(wanted) - len(pending), plan.num_images, progress_every_s)
        tuner = Tuner(
            trainable,
            param_space={"campaign": settings, "trial": tune.grid_search([dataclasses.asdict(t) for t in pending])},
            tune_config=TuneConfig(reuse_actors=True, max_concurrent_trials=plan.spec.max_concurrent,
                                   trial_dirname_creator=lambda trial: trial.trial_id),
            run_config=RunConfig(name=f"tune-{attempt}", storage_path=str(plan.directory / "ray"), verbose=0,
                                 failure_config=FailureConfig(max_failures=plan.spec.max_failures),
                                 callbacks=[progress, JsonLoggerCallback()]),
        )
        print(f"[campaign] {plan.spec.model} on {plan.dataset} ({plan.spec.dtype}): {len(pending)} of {len(wanted)} "
              f"trials to run, {plan.num_images} images each -> {plan.directory}", flush=True)
        results = tuner.fit()
        errors = tuple(f"{TrialPoint(**r.config['trial']).key}: {str(r.error).strip().splitlines()[-1]}"
                       for r in results if r.error is not None)
    done = finished_keys(plan.directory) & set(wanted)
    trials = aggregate(plan.directory, keys=done)
    return CampaignOutcome(plan.directory, len(wanted), len(done), errors, time.monotonic() - started,
                           int(sum(trials.column("images").to_pylist())))
