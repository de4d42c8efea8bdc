"""``python -m campaign plan``: a campaign's size and cost before it runs (statistical fault
injection, Leveugle et al. 2009). Per stratum the fault population, the injections a margin needs
(fixed-size, and stopping at the margin with the confidence sequence of trainables.sfi), what the
spec as given spends and the margin that buys, and the wall time from a short measured calibration.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass

from campaign.spec import CampaignSpec, ResolvedCampaign, SpecError
from trainables import sfi

GROUPINGS = ("trial", "site", "type")  # a stratum: one trial without its seed (site x bit x fault), a site, a type
# Seconds a trial costs beyond its injections (Tune scheduling, its parquet files and reports, the
# driver's checks), per slot, and the command's start before the first trial (Python and Ray's
# imports, a local Ray cluster's start or a connection to one, Tune's start and its first worker
# processes). Fitted on the development machine (2 CPUs) on 2026-12-03: the demo (25 trials, 34.6 s
# whole command) and 544 trials of 1,000 images (62.9 s): docs/statistics.md. Not measured by `plan`:
# pass --trial-overhead-s for a cluster. (Fitted earlier at 0.9 s with three other jobs on the CPUs.)
TRIAL_OVERHEAD_S = 0.15
RAY_START_S, RAY_CONNECT_S = 17.0, 7.0


@dataclass(frozen=True)
class Stratum:
    """One stratum of the plan and what it needs."""

    kind: str
    key: str  # site index (or module type for --by type)
    site_type: str
    bit: str  # the bit spec, or 'all of them' for --by site/type
    fault: str
    population: int  # distinct (fault, image) pairs: elements x bits x golden-correct images
    units: int  # trials per seed in the stratum (bits x faults x sites it pools)
    rate: float  # the rate planned with (0.5, or from --prior)
    prior: str  # where the rate came from
    needed: int  # Leveugle's fixed-size sample for the margin
    needed_cs: int  # injections of a campaign that stops at the margin with the confidence sequence (whole windows)
    spec_injections: int  # what `run` with the spec as given spends on it
    spec_margin: float  # the half-width that buys (Leveugle, at the planned rate)
    seconds_per_injection: float | None  # measured on this machine (None: not calibrated)


@dataclass(frozen=True)
class Plan:
    strata: tuple[Stratum, ...]
    margin: float
    confidence: float
    golden_correct: int  # injections one trial counts (the data set's golden-correct images)
    images: int
    slots: int  # trials run at once
    setup_s: float | None  # one worker's load + golden pass, measured
    calibration: str  # how the timing was measured
    budget_injections: int | None = None
    budget_margins: tuple[float, ...] = ()  # per stratum, what the budget buys split evenly
    trial_overhead_s: float = 0.0  # per trial, beyond its injections: scheduling, its files, reports
    start_s: float = 0.0  # the command's start before the first trial (Ray's start or connection)

    @property
    def needed(self) -> int:
        return sum(s.needed for s in self.strata)

    @property
    def needed_cs(self) -> int:
        return sum(s.needed_cs for s in self.strata)

    def seconds(self, injections_of) -> float | None:
        """Estimated wall time of spending ``injections_of(stratum)`` injections per stratum, in
        trials of at most one pass over the data set each (and at least one per unit)."""
        if any(s.seconds_per_injection is None for s in self.strata):
            return None
        work = sum(injections_of(s) * s.seconds_per_injection for s in self.strata)
        trials = sum(max(s.units, math.ceil(injections_of(s) / max(self.golden_correct, 1))) for s in self.strata)
        return (work + trials * self.trial_overhead_s) / self.slots + (self.setup_s or 0.0) + self.start_s


def parse_budget(text: str | None) -> tuple[int | None, float | None]:
    """--budget: injections ('2e6', '500000') or time ('90s', '30m', '2h') -> (injections, seconds)."""
    if text is None:
        return None, None
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([smh]?)\s*", str(text))
    try:
        value = float(m.group(1)) if m else math.nan
    except ValueError:
        value = math.nan
    if not m or not math.isfinite(value) or value <= 0:
        raise SpecError(f"budget: {text!r}: give injections (500000, 2e6) or a time (90s, 30m, 2h)")
    if m.group(2):
        return None, value * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
    return int(value), None


def check_plan_args(margin: float, confidence: float, by: str, calibrate_images: int) -> None:
    problems = []
    if not 0 < margin < 0.5:
        problems.append(f"margin: a half-width in (0, 0.5), got {margin}")
    if not 0 < confidence < 1:
        problems.append(f"confidence: a level in (0, 1), got {confidence}")
    if by not in GROUPINGS:
        problems.append(f"by: {by!r}: use one of {', '.join(GROUPINGS)}")
    if calibrate_images < 0:
        problems.append(f"calibrate_images: must be >= 0, got {calibrate_images}")
    if problems:
        raise SpecError("\n".join(problems))


def prior_rates(directory: str, by: str) -> dict[tuple, tuple[int, int]]:
    """(kind, key, bit, fault) -> (mismatches, golden_correct) pooled over seeds, from an earlier campaign."""
    import analysis

    try:
        trials = analysis.load(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise SpecError(f"prior: {exc}") from None
    out: dict[tuple, tuple[int, int]] = {}
    for row in trials.itertuples(index=False):
        key = _group_key(by, row.kind, int(row.site_index), row.site_type, str(row.bit_spec), str(row.fault))
        k, n = out.get(key, (0, 0))
        out[key] = (k + int(row.mismatches), n + int(row.golden_correct))
    return out


def _group_key(by: str, kind: str, site: int, site_type: str, bit: str, fault: str) -> tuple:
    if by == "trial":
        return (kind, str(site), bit, fault)
    if by == "site":
        return (kind, str(site), "*", "*")
    return (kind, site_type, "*", "*")


def planning_rate(counts: tuple[int, int] | None) -> tuple[float, str]:
    """The rate to plan with: 0.5 without a prior; else the value of the prior's Wilson 95%
    interval closest to 0.5 (conservative: a margin planned with it holds unless the prior erred)."""
    if counts is None or counts[1] == 0:
        return 0.5, "p=0.5"
    from trainables.stats import wilson_interval

    low, high = wilson_interval(*counts)
    return min(max(0.5, low), high), f"prior {counts[0]}/{counts[1]}"


def make_plan(spec: CampaignSpec, margin: float = 0.01, confidence: float = 0.99, by: str = "trial",
              prior: str | None = None, budget: str | None = None, calibrate_images: int = 512,
              slots: int | None = None, resolved: ResolvedCampaign | None = None,
              trial_overhead_s: float = TRIAL_OVERHEAD_S) -> Plan:
    """Resolve ``spec`` as `run` would, measure, and size each stratum."""
    from campaign.runner import settings_for
    from campaign.spec import resolve
    from trainables.inject.faults import parse_bit_spec
    from trainables.trial import CampaignSettings, pick_device, workbench

    check_plan_args(margin, confidence, by, calibrate_images)
    budget_injections, budget_seconds = parse_budget(budget)
    if budget_seconds is not None and calibrate_images == 0:
        raise SpecError("budget: a time budget needs the calibration (drop --calibrate-images 0)")
    priors = prior_rates(prior, by) if prior else {}
    plan = resolved or resolve(spec)
    settings = CampaignSettings.from_dict(settings_for(plan))
    import torch

    gpu = plan.spec.gpus_per_trial > 0 and torch.cuda.is_available()
    device, _ = pick_device([0] if gpu else [])
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(plan.spec.cpus_per_trial)))
    t0 = time.perf_counter()
    bench, _ = workbench(settings, device)
    setup_s = time.perf_counter() - t0
    correct = int(bench.golden_correct.sum())
    per_image = _calibrate(bench, plan, calibrate_images, parse_bit_spec) if calibrate_images else {}
    accuracy = correct / bench.num_images if bench.num_images else 0.0

    groups: dict[tuple, dict] = {}
    for t in plan.trials:
        site_type, elements = plan.site_sizes.get((t.kind, t.site), ("?", 1))
        key = _group_key(by, t.kind, t.site, site_type, str(t.bit), t.fault)
        g = groups.setdefault(key, {"type": site_type, "population": 0, "units": set(), "spi": [], "seeds": set()})
        bits = 1 if isinstance(t.bit, int) else bench.width_for(t.kind)
        unit = (t.site, str(t.bit), t.fault)
        if unit not in g["units"]:
            g["units"].add(unit)
            g["population"] += elements * bits * correct
            if per_image:
                g["spi"].append(per_image[(t.kind, t.site)] / max(accuracy, 1e-12))
        g["seeds"].add(t.seed)
    window = min(plan.spec.report_every, bench.num_images) * accuracy  # counted injections between looks
    strata = []
    for (kind, key, bit, fault), g in groups.items():
        population = max(1, g["population"])
        rate, source = planning_rate(priors.get((kind, key, bit, fault)))
        spent = len(g["seeds"]) * len(g["units"]) * correct
        strata.append(Stratum(
            kind, key, g["type"], bit if by == "trial" else "all", fault if by == "trial" else "all", population,
            len(g["units"]), rate, source, sfi.leveugle_sample_size(population, margin, confidence, rate),
            min(_whole_windows(sfi.cs_sample_size(margin, confidence, rate) if 0 < rate < 1 else 0, window), population),
            spent,
            sfi.leveugle_margin(spent, population, confidence, rate),
            sum(g["spi"]) / len(g["spi"]) if g["spi"] else None))
    n_slots = slots or _local_slots(plan.spec)
    out = Plan(tuple(strata), margin, confidence, correct, bench.num_images, n_slots, setup_s if calibrate_images else None,
               _calibration_text(calibrate_images, device, plan.spec, n_slots, slots is not None),
               trial_overhead_s=trial_overhead_s, start_s=RAY_CONNECT_S if plan.spec.address else RAY_START_S)
    if budget_seconds is not None:
        per_injection = sum(s.seconds_per_injection for s in strata) / len(strata)
        per_injection += trial_overhead_s / max(correct, 1)  # whole trials: their overhead spread over their faults
        budget_injections = int(max(0.0, budget_seconds - setup_s - out.start_s) * n_slots / per_injection)
    if budget_injections is not None:
        share = budget_injections / len(strata)
        margins = tuple(sfi.leveugle_margin(share, s.population, confidence, s.rate) for s in strata)
        out = dataclasses.replace(out, budget_injections=budget_injections, budget_margins=margins)
    return out


def _whole_windows(n: int, window: float) -> int:
    """``n`` rounded up to the looks a campaign stopping at a margin makes (every ``window``)."""
    return math.ceil(math.ceil(n / window) * window - 1e-9) if n and window > 0 else n


def _calibrate(bench, plan: ResolvedCampaign, images: int, parse_bit_spec) -> dict[tuple[str, int], float]:
    """Seconds per image of each (kind, site): after a warm-up window of one batch on the site (it
    fills the prefix cache, as a worker's first trial on a site does), one timed window of
    ``images`` images with the campaign's first bit and fault; at most 24 sites are timed, the
    others take the mean of their kind."""
    from trainables.inject import engine, proportional

    sites: dict[tuple[str, int], tuple] = {}
    for t in plan.trials:
        sites.setdefault((t.kind, t.site), (t.bit, t.fault, t.seed))
    chosen = list(sites)
    if len(chosen) > 24:
        step = len(chosen) / 24
        chosen = [chosen[int(i * step)] for i in range(24)]
    n = bench.num_images
    measured = {}
    for kind, index in chosen:
        bit_spec, fault_name, seed = sites[(kind, index)]
        bit = parse_bit_spec(bit_spec)
        fault = bench.check_fault(kind, bit, fault_name)
        if index == proportional.SITE:  # a proportional campaign's site pool
            site, run = proportional.pool(bench, kind, plan.sites_by_kind[kind]), proportional.run_faults
        else:
            site, run = bench.site(kind, index), engine.run_faults
        warm = min(plan.spec.batch_size, n)
        run(bench, site, kind, bit, seed, 0, warm, plan.spec.images_per_weight_fault, "none", fault=fault)
        start = warm if warm < n else 0
        stop = min(n, start + images)
        t0 = time.perf_counter()
        run(bench, site, kind, bit, seed, start, stop, plan.spec.images_per_weight_fault, "none", fault=fault)
        measured[(kind, index)] = (time.perf_counter() - t0) / (stop - start)
    by_kind: dict[str, list[float]] = {}
    for (kind, _), v in measured.items():
        by_kind.setdefault(kind, []).append(v)
    return {key: measured.get(key, sum(by_kind[key[0]]) / len(by_kind[key[0]])) for key in sites}


def _local_slots(spec: CampaignSpec) -> int:
    """Trials this machine runs at once under the spec's resources (what a local Ray cluster gets)."""
    slots = int((os.cpu_count() or 1) // spec.cpus_per_trial) or 1
    if spec.gpus_per_trial > 0:
        import torch

        slots = min(slots, int(torch.cuda.device_count() // spec.gpus_per_trial) or 1)
    if spec.max_concurrent:
        slots = min(slots, spec.max_concurrent)
    return max(1, slots)


def _calibration_text(images: int, device, spec: CampaignSpec, slots: int, given: bool) -> str:
    if not images:
        return "not calibrated (--calibrate-images 0): no time estimates"
    where = "--slots" if given else f"this machine: {os.cpu_count()} CPUs / {spec.cpus_per_trial:g} per trial" + (
        f", {spec.gpus_per_trial:g} GPU per trial" if spec.gpus_per_trial else "") + (
        f", at most {spec.max_concurrent}" if spec.max_concurrent else "")
    return (f"timed {images} images per site on {device} in this process (after a one-batch warm-up per site), "
            f"setup = model + data load + golden pass; {slots} trials at once ({where}), each as fast as this one")


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plan_lines(plan: Plan, spec_label: str = "") -> list[str]:
    """The plan as text: one row per stratum, then totals, times and the budget's margins."""
    c = f"{100 * plan.confidence:g}%"
    lines = [f"plan{spec_label}: margin +/-{100 * plan.margin:g} pp at {c} confidence; one trial counts "
             f"{plan.golden_correct:,} injections (golden-correct of {plan.images:,} images)",
             f"{'kind':>6} {'stratum':>10} {'type':>14} {'bit':>6} {'fault':>7} {'population':>14} {'rate':>7} "
             f"{'fixed n':>9} {'stop-at-margin n':>17} {'spec spends':>12} {'spec margin pp':>15}"
             + (f" {'budget margin pp':>17}" if plan.budget_margins else "")]
    for i, s in enumerate(plan.strata):
        extra = f" {100 * plan.budget_margins[i]:>17.3f}" if plan.budget_margins else ""
        lines.append(f"{s.kind:>6} {s.key:>10} {s.site_type[:14]:>14} {s.bit:>6} {s.fault[:7]:>7} {s.population:>14,} "
                     f"{s.rate:>7.4f} {s.needed:>9,} {s.needed_cs:>17,} {s.spec_injections:>12,} "
                     f"{100 * s.spec_margin:>15.3f}{extra}")
    spent = sum(s.spec_injections for s in plan.strata)
    priors = sum(s.prior != "p=0.5" for s in plan.strata)
    lines += [
        f"strata: {len(plan.strata)} ({priors} with a prior rate); injections: fixed-size plan {plan.needed:,}, "
        f"stopping at the margin (confidence sequence) about {plan.needed_cs:,}, the spec as given {spent:,}",
        f"time: fixed-size plan {_fmt_s(plan.seconds(lambda s: s.needed))}, stopping at the margin "
        f"{_fmt_s(plan.seconds(lambda s: s.needed_cs))}, the spec as given {_fmt_s(plan.seconds(lambda s: s.spec_injections))}",
        f"calibration: {plan.calibration}" + (f"; setup {plan.setup_s:.1f} s; plus {plan.trial_overhead_s:g} s per "
                                              f"trial (--trial-overhead-s) and {plan.start_s:g} s for Ray's start"
                                              if plan.setup_s is not None else ""),
        "fixed n: Leveugle et al. 2009 at the planned rate (Wilson/normal interval, one look); stop-at-margin n: the "
        "first n whose anytime-valid interval at that rate is narrow enough (what --margin spends)",
    ]
    if plan.budget_margins:
        worst = max(plan.budget_margins)
        lines.append(f"budget: {plan.budget_injections:,} injections split evenly ({plan.budget_injections // len(plan.strata):,} "
                     f"per stratum) buy +/-{100 * worst:.3f} pp at worst ({c}, fixed size)")
    return lines
