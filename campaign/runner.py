"""Run a resolved campaign as Ray Tune trials, one per (seed, site, bit), then aggregate.

The parquet part files are the source of truth: a (re)run launches only the trials whose
files are missing, so ``resume`` after Ctrl-C or a killed driver, and Tune's own retries
of crashed workers, converge on the same trials.parquet and faults/ as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune
from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner
from ray.tune.search.basic_variant import BasicVariantGenerator

from campaign import interrupts, outages, processes
from campaign.grid import distinct_trials, pending_trials
from campaign.numformats import effective_mode, name_suffix
from campaign.probe import check_shared
from campaign.spec import DIGEST_FIELDS, CampaignSpec, ResolvedCampaign, SpecError, resolve
from campaign.tune_store import tune_view
from trainables import storage
from trainables.results import (
    SPEC_FILE,
    CommitWatch,
    check_and_write,
    check_trials,
    discard_trial,
    read_spec,
    rename_campaign,
    write_spec,
)
from trainables.trial import CampaignSettings, TrialPoint, run_trial

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CampaignOutcome:
    directory: Path | str  # a URI string for campaigns on object storage
    total: int
    finished: int
    errors: tuple[str, ...]  # one line per trial that failed after its retries
    seconds: float
    injections: int  # by the trials this run launched
    launched: int = 0  # trials this run launched (0: nothing was left to run)
    rerun_damaged: tuple[str, ...] = ()  # finished trials whose files were missing or damaged, run again

    @property
    def complete(self) -> bool:
        return self.finished == self.total

    @property
    def errored(self) -> int:
        return len(self.errors)


def _trainable(config: dict, objects: dict | None = None) -> None:
    """Tune's function trainable: unpack the config, run the trial, report to Tune. ``objects``:
    campaign.run's in-memory model and data, from the object store (tune.with_parameters)."""
    if objects:
        from trainables.zoo import memory

        memory.install(objects)
    settings = CampaignSettings.from_dict(config["campaign"])
    point = TrialPoint(**config["trial"])
    crash_dir = config["campaign"].get("_crash_once_dir")
    if crash_dir:  # test hook: kill this worker process the first time each trial runs
        marker = Path(crash_dir) / point.key
        if not marker.exists():
            marker.touch()
            os._exit(1)
    barrier = config["campaign"].get("_barrier")
    if barrier:  # test hook: the first `parties` trials to start wait until all of them run at once
        _join_barrier(Path(barrier["dir"]), barrier["parties"], barrier["timeout_s"], ray.get_gpu_ids())
    report = tune.report
    hold = config["campaign"].get("_hold")
    if hold:  # test hook: each attempt waits at its first report (mid-trial) until the test releases it
        report = _held_report(Path(hold["dir"]), point.key, hold["timeout_s"])
    failures = config["campaign"].get("_write_failures")
    if failures:  # test hook: a full disk (ENOSPC on every write) once `after` trials have committed
        with _failing_writes(Path(failures["dir"]), failures["after"]):
            run_trial(settings, point, report=report, assigned_gpus=ray.get_gpu_ids())
        return
    run_trial(settings, point, report=report, assigned_gpus=ray.get_gpu_ids())


def _held_report(directory: Path, key: str, timeout_s: float):
    """Test hook: tune.report, except that the first call names this attempt's node and
    process in ``held-<key>-<pid>`` and waits, up to ``timeout_s``, for ``directory/release``."""
    held = []

    def report(metrics: dict) -> None:
        if not held:
            held.append(True)
            node = ray.get_runtime_context().get_node_id()
            (directory / f"held-{key}-{os.getpid()}").write_text(node)
            deadline = time.monotonic() + timeout_s
            while not (directory / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        tune.report(metrics)

    return report


@contextlib.contextmanager
def _failing_writes(campaign_dir: Path, after: int):
    """Test hook: while it is open, this worker's writes of campaign files fail as on a full
    disk once ``after`` trials of the campaign have committed."""
    import errno

    real = storage.write_bytes

    def write_bytes(loc, data):
        if len(list((campaign_dir / "parts" / "done").glob("*.json"))) >= after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(loc))
        real(loc, data)

    storage.write_bytes = write_bytes
    try:
        yield
    finally:
        storage.write_bytes = real


def _join_barrier(directory: Path, parties: int, timeout_s: float, gpu_ids) -> None:
    """Take the next arrival slot (an exclusive file naming this trial's GPUs); the first
    ``parties`` arrivals wait, up to ``timeout_s``, until every one of them has arrived, and
    mark that they met. Proves concurrent placement without timing assertions."""
    slot = 0
    while True:
        try:
            fd = os.open(directory / f"slot-{slot}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            slot += 1
    with os.fdopen(fd, "w") as f:
        f.write(",".join(map(str, gpu_ids)))
    if slot >= parties:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all((directory / f"slot-{i}").exists() for i in range(parties)):
            (directory / f"met-{slot}").touch()
            return
        time.sleep(0.05)


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
    if storage.exists(storage.join(directory, SPEC_FILE)):
        stored = read_spec(directory).get("identity", {})
        current = json.loads(json.dumps(plan.identity()))
        # digests absent from an older spec.json are not compared (recorded from now on)
        differs = [k for k, v in current.items() if (k in stored or k not in DIGEST_FIELDS) and stored.get(k) != v]
        if differs:
            raise SpecError(f"{directory} holds a different campaign (differs in: "
                            f"{', '.join(_difference(k, stored.get(k), current[k]) for k in differs)}); "
                            "choose another --name or --out, or `resume` it with the inputs it was run with")
    elif storage.list_entries(directory):
        raise SpecError(f"{directory} exists and is not a campaign directory; choose another --name or --out")


def _difference(key: str, then, now) -> str:
    """'bits: 'random' then, '31' now' or 'the weights: sha256 1a2b3c4d5e6f then, ... now'."""
    if key in DIGEST_FIELDS:
        short = lambda d: "none" if d is None else str(d).split(":")[-1][:12]  # noqa: E731
        return f"{DIGEST_FIELDS[key]} changed: sha256 {short(then)} then, {short(now)} now"
    return f"{key}: {then!r} then, {now!r} now"


def record_spec(plan: ResolvedCampaign) -> None:
    """Write spec.json: the resolved spec, seeds, sites and library versions."""
    write_spec(plan.directory, {
        "name": storage.name(plan.directory),
        "identity": plan.identity(),
        "spec": dataclasses.asdict(plan.spec),
        "seeds": list(plan.seeds),
        "num_images": plan.num_images,
        "num_trials": len(plan.trials),
        "sites": plan.sites_by_kind,
        "site_sizes": {kind: {str(index): list(v) for (k, index), v in plan.site_sizes.items() if k == kind}
                       for kind in plan.sites_by_kind},  # elements a fault can hit: whole-model weights (analysis.sfi)
        "site_table": plan.site_table,
        "protection": plan.protection,  # protected campaigns: the protected sites and their bounds
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def spec_from_directory(directory: str | Path, **overrides) -> CampaignSpec:
    """The spec stored in a campaign directory (seeds fixed), for ``resume``."""
    directory = storage.location(directory)
    if storage.is_uri(directory) and not storage.exists(storage.join(directory, SPEC_FILE)):
        try:
            storage.check_readable(directory)  # a gone bucket or refused credentials, rather than "no spec.json"
        except ValueError as exc:
            raise SpecError(f"resume: {exc}") from None
    stored = read_spec(directory)
    try:
        values = dict(stored["spec"])
        values.update(out=str(storage.parent(directory)), name=storage.name(directory), seeds=tuple(stored["seeds"]),
                      sites=tuple(values["sites"]))
        values.setdefault("stop_interval", "wilson")  # written before the confidence sequence: stopped on Wilson
        values.update({k: v for k, v in overrides.items() if v is not None})
        if (stored.get("protection") or {}).get("calibration") and not values.get("bounds"):
            values.update(bounds=str(storage.join(directory, SPEC_FILE)), calibration=None)  # resume on the profiled bounds
        return CampaignSpec(**values)
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"{storage.join(directory, SPEC_FILE)} is not a complete campaign spec ({type(exc).__name__}: {exc}): "
                        "it was not written by `python -m campaign run`, or it was edited") from None


def settings_for(plan: ResolvedCampaign) -> dict:
    s = plan.spec
    return dataclasses.asdict(CampaignSettings(
        name=storage.name(plan.directory), directory=str(plan.directory), model=s.model, dataset=plan.dataset,
        hub_dir=s.hub_dir, hub_ref=s.hub_ref, weights=s.weights, data_root=s.data_root, images=s.images,
        mode=effective_mode(s), batch_size=s.batch_size, images_per_weight_fault=s.images_per_weight_fault, record=s.record,
        target_margin=s.target_margin if s.margin is None else s.margin, report_every=s.report_every,
        stop_interval=s.stop_interval, confidence=s.confidence, cpus_per_trial=s.cpus_per_trial,
        inputs=dict(plan.inputs),
        prefix=s.prefix if s.new_tokens is not None else plan.reuses_prefix,  # generation: the golden-state start
        prefix_cache_mb=s.prefix_cache_mb,
        protect=plan.protection["protect"] if plan.protection else None, protection=plan.protection,
        weight_format=s.weight_format, transform=s.transform, input_column=s.input_column, label_column=s.label_column,
        data_cache=s.data_cache, model_args=json.dumps(s.model_args, sort_keys=True) if s.model_args else None,
        site_pool={k: list(v) for k, v in plan.sites_by_kind.items()} if s.site_sampling == "proportional" else None,
        seq_len=s.seq_len, new_tokens=s.new_tokens,
    ))


TUNE_SNAPSHOT_S_ON_STORES = 300  # Tune's experiment-state snapshots when the campaign is on an object store
ADDRESS_TIMEOUT_S = 5.0  # how long to wait for a cluster address to accept a connection


def check_address(address: str | None, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """Refuse a cluster address that does not accept a TCP connection within ``timeout_s``
    (ray.init would wait for minutes); 'auto', 'local' and None are left to Ray."""
    if address is None or address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SpecError(f"address: {address!r} is not host:port (or ray://host:port, auto, local)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        why = "no answer" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise SpecError(f"address: cannot reach a Ray cluster at {address} ({why} within {timeout_s:g} s)") from None


class CampaignInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a campaign; ``directory`` is the campaign to resume."""

    def __init__(self, directory: Path) -> None:
        super().__init__(str(directory))
        self.directory = directory


class _DropNotice(logging.Filter):
    """Drops Ray's notice that a new local cluster uses token authentication: the security
    stays on, and the notice asks nothing of the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


_NOTICE_FILTER = _DropNotice()


class _DropMetricsNotice(logging.Filter):
    """Drops Tune's notice, at the end of a run, that its trials have no metrics files: the
    campaign writes none on purpose (the part files are its results; see TrialFolders)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to fetch metrics for ")


_METRICS_LOGGER = "ray.tune.analysis.experiment_analysis"


class CommitChecks(tune.Callback):
    """Hands each trial that finished to a CommitWatch, which checks its commit and reads its
    parts while the other trials run: the campaign's end reads only what it has not seen."""

    def __init__(self, watch: CommitWatch) -> None:
        self.watch = watch
        self.committed: dict[str, dict] = {}  # trial id -> what its commit lists (its last report)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "commit" in result:  # JSON text: Tune keeps statistics of every numeric leaf of a result
            self.committed[trial.trial_id] = json.loads(result["commit"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.watch.finished(TrialPoint(**trial.config["trial"]).key, self.committed.pop(trial.trial_id, None))


class TrialErrors(tune.Callback):
    """Each errored trial's key and last error line, read from Tune's own Trial (config
    always set) when the error happens: the result grid's ``config`` can be None."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}  # trial id -> our trial key
        self.reasons: dict[str, str] = {}  # trial key -> the last line of its latest error

    def on_trial_start(self, iteration, trials, trial, **info):
        self.keys[trial.trial_id] = TrialPoint(**trial.config["trial"]).key

    def on_trial_error(self, iteration, trials, trial, **info):
        key = self.keys.get(trial.trial_id) or TrialPoint(**trial.config["trial"]).key
        self.reasons[key] = last_error_line(trial.error_file)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.keys.pop(trial.trial_id, None)  # the driver keeps nothing per finished trial


def last_error_line(path: str | None) -> str:
    """The last non-empty line of a Tune error file ('no error text' when there is none)."""
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except (OSError, TypeError):
        lines = []
    return lines[-1] if lines else "no error text"


def failure_lines(launched: list[str], finished, reasons: dict[str, str]) -> tuple[str, ...]:
    """'key: reason' for each launched trial that has no verified commit, in launch order: the
    campaign's own truth (its commit markers), whatever Tune's results say."""
    return tuple(f"{key}: {reasons.get(key, 'did not finish (no error reported by Tune)')}"
                 for key in launched if key not in finished)


class StopRequests(tune.Callback):
    """Raise a requested stop again at every Tune step (campaign.interrupts)."""

    def on_step_begin(self, iteration, trials, **info):
        interrupts.check()


class TrialFolders(tune.Callback):
    """Removes each finished trial's folder from Tune's driver staging directory while it is
    empty (the campaign writes no Tune metrics files: the part files are its results), so Tune's
    experiment syncs, which copy that directory to the campaign's store one object at a time,
    copy no finished trial. A trial that errored keeps its folder and error files."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        try:
            os.rmdir(trial.local_path)
        except (OSError, TypeError):
            pass  # not empty, already gone, or no folder


class OutageWatch(tune.Callback):
    """Stops Tune (raises StorageOutage in its loop) when the campaign location is out of
    service: when a trial attempt fails on it and PROBE_ATTEMPTS probes fail too, when
    attempts fail on it with no commit between (the workers' view, where it differs from the
    driver's): FAILURES_IN_A_ROW of one trial, or that many per running trial (a blip that
    fails every running trial at once is retried), or when a probe every PROBE_EVERY_S (or
    after one of Tune's own writes failed) fails PROBE_ATTEMPTS times. Transient errors pass:
    Tune retries the trial (--max-failures) as before."""

    def __init__(self, directory, keys: dict | None = None, probe_every_s: float = outages.PROBE_EVERY_S) -> None:
        self.directory = directory
        self.keys = keys if keys is not None else {}
        self.probe_every_s = probe_every_s
        self.in_a_row = 0  # attempts failed on the location since the last commit
        self.by_trial: dict[str, int] = {}  # the same, per trial
        self.suspected = False  # one of Tune's own writes failed on the location (outages.LogQuieter)
        self.cause: str | None = None
        self.last_probe = time.monotonic()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._failed(trial, trials, "retrying")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._failed(trial, trials, "no retries left (--max-failures): resume runs it")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.in_a_row = 0
        self.by_trial.clear()

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if self.suspected or now - self.last_probe >= self.probe_every_s:
            self.suspected, self.last_probe = False, now
            if self._quick_check() is not None:
                self._stop(outages.confirm(self.directory))
            self.last_probe = time.monotonic()

    def _quick_check(self) -> str | None:
        """Cheap on a local disk (its free space), one probe on a store."""
        if storage.is_uri(self.directory):
            return storage.probe_outage(self.directory)
        return storage.disk_full_line(self.directory) if storage.free_bytes(self.directory) < storage.MIN_FREE_BYTES else None

    def _failed(self, trial, trials, then: str) -> None:
        text = outages.error_text(trial.error_file)
        suspect = storage.outage(self.directory, text)
        if suspect is None:
            return  # the trial's own error: Tune's retries and the failure lines as before
        self.in_a_row += 1
        self.by_trial[trial.trial_id] = self.by_trial.get(trial.trial_id, 0) + 1
        cause = outages.confirm(self.directory)
        self.last_probe = time.monotonic()
        running = sum(getattr(t, "status", None) == "RUNNING" for t in trials)
        if cause is None and (self.by_trial[trial.trial_id] >= outages.FAILURES_IN_A_ROW
                              or self.in_a_row >= outages.FAILURES_IN_A_ROW * max(1, running)):
            base, _, detail = suspect.partition(" (")  # the workers see what this driver does not
            cause = (f"{base} where the trials run ({outages.os_reason(text) or detail.rstrip(')')}: {self.in_a_row} "
                     "attempts in a row; this driver's probe passes)")
        if cause is None:
            key = self.keys.get(trial.trial_id, trial.trial_id)
            print(f"[campaign] {key} failed: {suspect}; the location answers a probe again: {then}", flush=True)
        self._stop(cause)

    def _stop(self, cause: str | None) -> None:
        if cause is not None:
            self.cause = cause
            raise outages.StorageOutage(cause)


def connect(spec: CampaignSpec) -> None:
    """Join the given or running Ray cluster, else start a local one; check it can host a trial."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_NOTICE_FILTER)
    if not ray.is_initialized():
        # the driver's working directory too: a py: model's module reaches local workers as it reached the driver
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.getcwd(), os.environ.get("PYTHONPATH")])),
               **storage.environment(spec.out)}  # an object store's standard variables, for the trials' writes
        in_job = "RAY_JOB_ID" in os.environ or os.environ.get("RAY_ADDRESS")
        stopped = processes.stop_orphans()
        if stopped:
            print(f"[campaign] stopped {len(stopped)} process(es) left running by a campaign driver that was killed "
                  f"(pids {', '.join(map(str, stopped[:8]))}{', ...' if len(stopped) > 8 else ''})", flush=True)
        on_sigterm = signal.getsignal(signal.SIGTERM)
        processes.note_preexisting()
        ray.init(address=spec.address, include_dashboard=False if not in_job and not spec.address else None,
                 runtime_env=None if in_job else {"env_vars": env}, logging_level="WARNING", log_to_driver=True)
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)  # Ray's failure handler would dump a C stack and abort
        processes.record_started()  # what this driver started (a local cluster), for the next driver if it is killed
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
        self.finished_here = 0  # trials finished by this run: the ETA waits for the first
        self.errored = 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not self.running and not self.finished_here:
            processes.record_started()  # the worker processes, now that they exist
        self.running[trial.trial_id] = int(result.get("images", 0))
        self._maybe_print()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        self.finished_here += 1
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
        eta = f", ETA {time.strftime('%H:%M:%S', time.gmtime(remaining / rate))}" if rate > 0 and self.finished_here else ""
        errors = f", {self.errored} errored" if self.errored else ""
        print(f"[campaign] {self.done}/{self.total} trials, {rate:,.0f} inj/s{eta}{errors}", flush=True)


def run_campaign(spec: CampaignSpec, **options) -> CampaignOutcome:
    """Validate, run the missing trials on Ray Tune, aggregate the parquet files (options: see
    _run_campaign). Raises CampaignOutage, with one line, when the campaign's disk or store
    goes out of service; its commit markers keep what was done for ``resume``."""
    try:
        return _run_campaign(spec, **options)
    except OSError as exc:  # a write or read of the driver's own (spec, aggregation, checks)
        directory = spec.directory
        suspect = storage.outage(directory, exc)
        if suspect is None:
            raise
        raise outages.CampaignOutage(directory, outages.confirm(directory) or suspect) from None


def _run_campaign(spec: CampaignSpec, *, _crash_once_dir: str | None = None, _barrier: dict | None = None,
                  _hold: dict | None = None,
                  _write_failures: dict | None = None, progress_every_s: float = 5.0,
                  resolved: ResolvedCampaign | None = None, only: list | None = None,
                  objects: dict | None = None, wave_size: int | None = None) -> CampaignOutcome:
    """``resolved``: ``spec`` resolved already; ``only``: run and aggregate these of its trials
    (a round of a campaign that stops per stratum, campaign.adaptive); ``objects``: in-memory
    models and data (trainables.zoo.memory) sent to the workers via the object store;
    ``wave_size``: trials per Tune run (DEFAULT_WAVE_SIZE): Tune's state and the driver's
    per-trial objects are bounded by it, not by the campaign."""
    started = time.monotonic()
    wave_size = check_wave_size(wave_size)
    check_store(spec)
    plan = resolved or resolve(spec)
    if only is not None:
        plan = dataclasses.replace(plan, trials=tuple(only))
    check_directory(plan)
    check_writable(plan.directory)
    check_address(plan.spec.address)
    trials, wanted = distinct_trials(plan.trials)  # a lazy grid stays lazy: waves are taken from it in turn
    state = check_trials(plan.directory, wanted)
    damaged = dict(sorted(state.damaged.items()))
    pending = len(wanted) - len(state.finished)  # finished: of the wanted keys only
    errors: tuple[str, ...] = ()
    if pending:
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV/TensorBoard files per trial
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables, only our progress line
        connect(plan.spec)  # the last checks (cluster resources, shared storage) before anything is written
        check_shared(plan.directory)
    for key in damaged:  # no damaged file may stay behind, even if its trial fails again
        discard_trial(plan.directory, key)
    if damaged:
        print(f"[campaign] {len(damaged)} finished trial(s) have missing or damaged files and run again: "
              + "; ".join(f"{key} ({why})" for key, why in damaged.items()), flush=True)
    parts = storage.list_names(storage.join(plan.directory, "parts", "trials"), ".parquet")
    uncommitted = sorted(stem for stem in (n[: -len(".parquet")] for n in parts)
                         if stem in wanted and stem not in state.finished and stem not in damaged)
    if uncommitted:
        print(f"[campaign] {len(uncommitted)} trial(s) have files but no commit marker (interrupted while writing, or "
              f"written by an older version) and run again: {', '.join(uncommitted[:5])}"
              f"{', ...' if len(uncommitted) > 5 else ''}", flush=True)
    _adopt_location(plan)
    record_spec(plan)
    verified = None
    if pending:
        settings = settings_for(plan)
        if _crash_once_dir:
            settings["_crash_once_dir"] = _crash_once_dir
        if _barrier:
            settings["_barrier"] = _barrier
        if _hold:
            settings["_hold"] = _hold
        if _write_failures:
            settings["_write_failures"] = _write_failures
        function = tune.with_parameters(_trainable, objects=objects) if objects else _trainable
        trainable = tune.with_resources(function, {"cpu": plan.spec.cpus_per_trial, "gpu": plan.spec.gpus_per_trial})
        tune_dir = storage.join(plan.directory, "ray")
        attempt = next_attempt(storage.list_entries(tune_dir))
        tune_fs, tune_path = storage.resolve(tune_dir) if storage.is_uri(tune_dir) else (None, str(tune_dir))
        tune_fs = tune_view(tune_fs) if tune_fs is not None else None  # no requests that can only miss
        progress = Progress(len(wanted), len(state.finished), plan.num_images, progress_every_s)
        watch = CommitWatch(plan.directory)
        trial_errors = TrialErrors()
        watchdog = OutageWatch(plan.directory, trial_errors.keys)
        waves = wave_slices(pending, wave_size)
        print(f"[campaign] {plan.spec.model} on {plan.dataset} ({name_suffix(plan.spec)}): {pending} of {len(wanted)} "
              f"trials to run, {plan.num_images} images each -> {plan.directory}"
              + (f" (in {len(waves)} waves of up to {wave_size})" if len(waves) > 1 else ""), flush=True)
        for note in plan.notes:  # once per campaign; the trial rows say which path ran (column path)
            print(f"[campaign] {note}", flush=True)
        os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C: our resume hint, not Tune's restore advice
        # On an object store Tune uploads its whole experiment state at every snapshot (every 10 s or more):
        # snapshot rarely there; the part files, not Tune's state, are what a resume reads.
        tune_env = ({"TUNE_GLOBAL_CHECKPOINT_S": str(TUNE_SNAPSHOT_S_ON_STORES)}
                    if storage.is_uri(plan.directory) and "TUNE_GLOBAL_CHECKPOINT_S" not in os.environ else {})
        if "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ:  # Tune's default, 200 queued placement groups, costs
            tune_env["TUNE_MAX_PENDING_TRIALS_PG"] = str(max_pending(plan.spec))  # time at the start and every step
        os.environ.update(tune_env)
        notice = _DropMetricsNotice()
        logging.getLogger(_METRICS_LOGGER).addFilter(notice)
        quieted = outages.quiet(watchdog)
        to_run = pending_trials(trials, state.finished)
        try:
            for number, (first, stop) in enumerate(waves):
                interrupts.check()
                keys, wave = zip(*itertools.islice(to_run, stop - first))
                staging = WaveStaging()
                tuner = Tuner(
                    trainable,
                    param_space={"campaign": settings,
                                 "trial": {field.name: None for field in dataclasses.fields(TrialPoint)}},
                    tune_config=TuneConfig(search_alg=trial_points(wave, plan.spec.max_concurrent), num_samples=len(wave),
                                           reuse_actors=True, trial_dirname_creator=trial_folder),
                    run_config=RunConfig(name=f"tune-{attempt + number}", storage_path=tune_path,
                                         storage_filesystem=tune_fs, verbose=0,
                                         failure_config=FailureConfig(max_failures=plan.spec.max_failures),
                                         callbacks=[StopRequests(), progress, CommitChecks(watch), trial_errors,
                                                    TrialFolders(), watchdog, staging]),
                )
                tuner.fit()
                del tuner
                interrupts.check()  # an interrupt that Tune or a finalizer swallowed
                if number + 1 < len(waves):  # Tune's state of a wave whose every commit checked out: dropped
                    if len(watch.wait(keys)) == len(keys):
                        drop_wave_state(storage.join(tune_dir, f"tune-{attempt + number}"), staging.path)
        except KeyboardInterrupt:
            check_and_write(plan.directory, wanted, verified=watch.results())
            raise CampaignInterrupted(plan.directory) from None
        except Exception as exc:  # the watchdog's stop, or Tune's own write failing on the location
            cause = watchdog.cause
            if cause is None:
                suspect = storage.outage(plan.directory, "".join(traceback.format_exception(exc)))
                if suspect is None:
                    raise
                cause = outages.confirm(plan.directory) or suspect
            raise outages.CampaignOutage(plan.directory, cause) from None
        finally:
            outages.unquiet(quieted)
            processes.forget()
            logging.getLogger(_METRICS_LOGGER).removeFilter(notice)
            for key in tune_env:
                os.environ.pop(key, None)
        verified = watch.results()
    final, (rows, _) = check_and_write(plan.directory, wanted, verified=verified)
    del verified
    if pending:
        errors = failure_lines((key for key, _ in pending_trials(trials, state.finished)), final.finished,
                               trial_errors.reasons)
    # the trials launched here: the wanted ones not finished before (every aggregated row is wanted)
    injections = sum(n for key, n in zip(rows.column("trial_key").to_pylist(), rows.column("images").to_pylist())
                     if key not in state.finished)
    return CampaignOutcome(plan.directory, len(wanted), len(final.finished), errors, time.monotonic() - started,
                           int(injections), pending, tuple(damaged))


DEFAULT_WAVE_SIZE = 4096  # trials handed to one Tune run: what Tune and the driver hold at once


def wave_slices(count: int, wave_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each wave of ``count`` pending trials, in order, ``wave_size`` at most each."""
    return [(start, min(start + wave_size, count)) for start in range(0, count, wave_size)]


def next_attempt(entries: list[str]) -> int:
    """The number of the next Tune run in a campaign's ray/ folder: one past the highest there
    (waves whose state was dropped leave gaps)."""
    numbers = [int(n) for n in (e[len("tune-"):] for e in entries if e.startswith("tune-")) if n.isdigit()]
    return max(numbers) + 1 if numbers else 0


class WaveStaging(tune.Callback):
    """Notes the local folder where Tune stages a wave's experiment state on the driver."""

    def __init__(self) -> None:
        self.path: str | None = None

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.path is None:
            with contextlib.suppress(Exception):
                self.path = trial.storage.experiment_driver_staging_path


def drop_wave_state(experiment: Path | str, staging: str | None) -> None:
    """Remove a finished wave's Tune experiment folder (under the campaign's ray/) and its
    staging folder on the driver: the commit markers, not Tune's state, are what a resume reads."""
    with contextlib.suppress(OSError):
        storage.delete_tree(experiment)
    if staging:
        import shutil

        shutil.rmtree(Path(staging).parent, ignore_errors=True)


def check_wave_size(wave_size: int | None) -> int:
    """The wave size to use; SpecError, in one line, for one that is not a positive integer."""
    if wave_size is None:
        return DEFAULT_WAVE_SIZE
    if isinstance(wave_size, bool) or not isinstance(wave_size, int) or wave_size < 1:
        raise SpecError(f"wave_size: must be a positive integer, got {wave_size!r}")
    return wave_size


def trial_folder(trial) -> str:
    """A trial's folder under Tune's run directory: its id (module level, so Tune's state
    pickles a reference to it, not the function, with every trial)."""
    return trial.trial_id


def max_pending(spec: CampaignSpec) -> int:
    """How many trials Tune queues (each with a placement group request) beside those running:
    twice the trials the cluster can run at once, at least 8, so a freed worker always finds
    its next trial."""
    resources = ray.cluster_resources()
    slots = resources.get("CPU", 0) // spec.cpus_per_trial
    if spec.gpus_per_trial > 0:
        slots = min(slots, resources.get("GPU", 0) // spec.gpus_per_trial)
    if spec.max_concurrent:
        slots = min(slots, spec.max_concurrent)
    return max(8, 2 * int(slots))


def trial_points(pending: list, max_concurrent: int | None) -> BasicVariantGenerator:
    """Tune's search over the campaign's trials, one preset point each, in order. A grid
    search over them would cost Tune O(n^2): it deep-copies the whole grid for every trial
    (4 s before the first trial of a 544-trial campaign here, and growing as the square)."""
    return BasicVariantGenerator(points_to_evaluate=[{"trial": dataclasses.asdict(t)} for t in pending],
                                 max_concurrent=max_concurrent or 0)


def check_store(spec: CampaignSpec) -> None:
    """An --out on object storage: refuse, in one line and within bounded time, a location
    that is malformed, has no bucket, refuses the credentials or cannot be reached (before
    the model is loaded; local paths are checked by check_writable)."""
    try:
        storage.check_location(spec.out)
    except ValueError as exc:
        raise SpecError(f"out: {exc}") from None


def check_writable(directory: Path | str) -> None:
    """Refuse an output directory that cannot be created or written, before Ray starts."""
    if storage.is_uri(directory):
        return  # written and deleted a probe object already (check_store)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SpecError(f"out: cannot create {directory}: {existing} is a file, not a directory")
    try:  # a probe file, removed at once: permissions alone do not tell (root, read-only mounts, /proc)
        fd, probe = tempfile.mkstemp(prefix=".bitflip-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SpecError(f"out: cannot write to {directory} ({existing}: {exc.strerror}); choose another --out") from None


def _adopt_location(plan: ResolvedCampaign) -> None:
    """A campaign directory that was moved or copied takes its new name in every row."""
    if not storage.exists(storage.join(plan.directory, SPEC_FILE)):
        return
    name = storage.name(plan.directory)
    old = read_spec(plan.directory).get("name")
    if old is not None and old != name:
        renamed = rename_campaign(plan.directory, name)
        if renamed:
            print(f"[campaign] {plan.directory} was moved or copied from a campaign named {old!r}: "
                  f"renamed it in the files of {renamed} trial(s)", flush=True)
