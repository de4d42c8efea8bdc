"""Campaigns that stop each stratum at a margin (``run --margin``): rounds of one trial per
unfinished stratum (site x bit x fault), each with the next seed; a trial stops as soon as its
stratum's pooled counts give an anytime-valid interval (trainables.sfi.confidence_sequence)
narrower than the margin, and a stratum that reached it gets no more trials. ``--num-seeds`` is
the most rounds. The trials stay (seed, site, bit) trials on Ray; the part files are the truth,
so a resume replays the rounds from them and reaches the same decisions. The rounds are
recorded in ``sfi.json`` in the campaign directory.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

from campaign.spec import CampaignSpec, ResolvedCampaign, TrialPlan, resolve
from trainables import sfi, storage

SFI_FILE = "sfi.json"


@dataclass(frozen=True)
class StratumState:
    """A stratum's pooled counts after the rounds so far, and whether it reached the margin."""

    key: tuple  # (kind, site, bit, fault)
    mismatches: int
    golden_correct: int
    trials: int
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def stratum_key(t: TrialPlan) -> tuple:
    return (t.kind, t.site, str(t.bit), t.fault)


def strata_of(plan: ResolvedCampaign) -> dict[tuple, list[TrialPlan]]:
    """Each stratum's trials in the order of the campaign's seeds (round r runs seed r)."""
    order = {seed: i for i, seed in enumerate(plan.seeds)}
    out: dict[tuple, list[TrialPlan]] = {}
    for t in plan.trials:
        out.setdefault(stratum_key(t), []).append(t)
    return {k: sorted(v, key=lambda t: order[t.seed]) for k, v in out.items()}


def pooled_states(directory, chosen: dict[tuple, list[TrialPlan]], confidence: float) -> dict[tuple, StratumState]:
    """Pooled counts and confidence sequence per stratum, from the campaign's trials.parquet."""
    import analysis

    trials = analysis.load(directory)
    by_key = {row.trial_key: (int(row.mismatches), int(row.golden_correct)) for row in trials.itertuples(index=False)}
    from trainables.results import trial_key

    out = {}
    for key, plans in chosen.items():
        k = n = 0
        for t in plans:
            a, b = by_key.get(trial_key(t.kind, t.site, t.bit, t.seed, t.fault), (0, 0))
            k, n = k + a, n + b
        low, high = sfi.confidence_sequence(k, n, confidence)
        out[key] = StratumState(key, k, n, len(plans), low, high)
    return out


def run_margin_campaign(spec: CampaignSpec, **kwargs):
    """Run ``spec`` (with ``margin``) in rounds until every stratum reached the margin or the
    seeds ran out; returns the CampaignOutcome of the last round, with the time, injections and
    launches of all rounds."""
    from campaign.runner import run_campaign

    plan = resolve(spec)
    strata = strata_of(plan)
    chosen: dict[tuple, list[TrialPlan]] = {k: [] for k in strata}
    states: dict[tuple, StratumState] = {}
    rounds, outcome = [], None
    for r in range(len(plan.seeds)):
        active = [k for k in strata if r < len(strata[k]) and (r == 0 or states[k].half_width >= spec.margin)]
        if not active:
            break
        for k in active:
            prior = states.get(k)
            chosen[k].append(dataclasses.replace(strata[k][r], prior_k=prior.mismatches if prior else 0,
                                                 prior_n=prior.golden_correct if prior else 0))
        print(f"[campaign] round {r + 1}: {len(active)} of {len(strata)} strata not yet within "
              f"+/-{100 * spec.margin:g} pp ({100 * spec.confidence:g}% confidence sequence) run seed {plan.seeds[r]}",
              flush=True)
        last = run_campaign(spec, resolved=plan, only=[t for plans in chosen.values() for t in plans], **kwargs)
        outcome = last if outcome is None else dataclasses.replace(
            last, seconds=outcome.seconds + last.seconds, injections=outcome.injections + last.injections,
            launched=outcome.launched + last.launched, rerun_damaged=outcome.rerun_damaged + last.rerun_damaged)
        if not outcome.complete:
            _record(plan, spec, rounds, states, active, r, complete=False)
            return outcome
        states = pooled_states(plan.directory, {k: v for k, v in chosen.items() if v}, spec.confidence)
        _record(plan, spec, rounds, states, active, r, complete=True)
    reached = sum(s.half_width < spec.margin for s in states.values())
    spent = sum(s.golden_correct for s in states.values())
    print(f"[campaign] margin: {reached} of {len(strata)} strata reached +/-{100 * spec.margin:g} pp "
          f"({100 * spec.confidence:g}%, confidence sequence) in {len(rounds)} round(s); {spent:,} injections counted; "
          f"widest +/-{100 * max(s.half_width for s in states.values()):.3f} pp", flush=True)
    return outcome


def _record(plan, spec, rounds: list, states: dict, active: list, r: int, complete: bool) -> None:
    """Append round ``r`` to sfi.json: who ran, and each stratum's pooled state after it."""
    rounds.append({"round": r + 1, "seed": plan.seeds[r], "ran": [list(k) for k in active], "complete": complete,
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    record = {"method": "margin", "margin": spec.margin, "confidence": spec.confidence,
              "interval": "beta-binomial mixture confidence sequence, Beta(1/2, 1/2) (Robbins 1970; Howard et al. 2021)",
              "rounds": rounds,
              "strata": [{"kind": s.key[0], "site": s.key[1], "bit": s.key[2], "fault": s.key[3],
                          "mismatches": s.mismatches, "golden_correct": s.golden_correct, "trials": s.trials,
                          "low": s.low, "high": s.high, "reached": s.half_width < spec.margin}
                         for s in states.values()]}
    storage.write_bytes(storage.join(plan.directory, SFI_FILE), json.dumps(record, indent=2).encode())


def allocation_targets(method: str, total: int, sizes, mismatches, correct) -> list[int]:
    """Each stratum's share of ``total`` injections by ``method``, from the counts so far: uniform
    (equal), proportional (to the population: pooled counts estimate the whole-model rate), neyman (N_h sqrt(p q): the whole-model estimate) or equal-width (p q: equal margins),
    with rates (k + 1/2) / (n + 1) so that a stratum that saw no failure still gets a little."""
    rates = sfi.shrunk_rate(mismatches, correct)
    if method == "uniform":
        return sfi.round_to_total([1.0] * len(rates), total)
    if method == "proportional":  # n_h proportional to N_h: a self-weighting sample of the whole model
        return sfi.round_to_total(sizes, total)
    if method == "neyman":
        return sfi.neyman_allocation(total, sizes, rates)
    return sfi.equal_width_allocation(total, rates)


def _trials_for(plans: list[TrialPlan], first: int, images: int, per_trial: int) -> list[TrialPlan]:
    """``images`` more images of a stratum as trials from its ``first``-th seed on, each at most a
    data set (the last one limited)."""
    out = []
    while images > 0:
        take = min(images, per_trial)
        out.append(dataclasses.replace(plans[first + len(out)], limit=take if take < per_trial else 0))
        images -= take
    return out


def run_allocated_campaign(spec: CampaignSpec, **kwargs):
    """Spend ``spec.budget`` injections: a ``spec.pilot`` share evenly over the strata, then the
    rest by ``spec.allocate`` from the pilot's rates. Two rounds of (seed, site, bit) trials; a
    stratum's trials take its seeds in order, the last one limited to the images it is owed."""
    from campaign.runner import run_campaign
    from campaign.spec import SpecError

    plan = resolve(spec)
    strata = strata_of(plan)
    keys = list(strata)
    per_trial = plan.num_images
    seeds_needed = -(-spec.budget // per_trial) + 1
    if len(plan.seeds) < seeds_needed:
        raise SpecError(f"allocate: a budget of {spec.budget:,} injections of {per_trial:,} images per trial may put up "
                        f"to {seeds_needed} trials on one stratum: pass --num-seeds {seeds_needed} (or more)")
    pilot = sfi.round_to_total([1.0] * len(keys), int(spec.budget * spec.pilot))
    chosen = {k: _trials_for(strata[k], 0, pilot[i], per_trial) for i, k in enumerate(keys)}
    rounds: list[dict] = []
    print(f"[campaign] allocate {spec.allocate}: pilot of {sum(pilot):,} injections over {len(keys)} strata", flush=True)
    outcome = run_campaign(spec, resolved=plan, only=[t for v in chosen.values() for t in v], **kwargs)
    states = pooled_states(plan.directory, {k: v for k, v in chosen.items() if v}, spec.confidence)
    rounds.append({"round": 1, "name": "pilot", "images": dict(zip(map(_name, keys), pilot)), "complete": outcome.complete})
    if not outcome.complete:
        _record_allocation(plan, spec, rounds, states)
        return outcome
    sizes = [plan.site_sizes.get((k[0], k[1]), ("", 1))[1] for k in keys]
    k_seen = [states[k].mismatches if k in states else 0 for k in keys]
    n_seen = [states[k].golden_correct if k in states else 0 for k in keys]
    targets = allocation_targets(spec.allocate, spec.budget, sizes, k_seen, n_seen)
    deficits = [max(0, t - p) for t, p in zip(targets, pilot)]
    extra = sfi.round_to_total(deficits, spec.budget - sum(pilot)) if sum(deficits) else [0] * len(keys)
    for i, k in enumerate(keys):
        chosen[k] = chosen[k] + _trials_for(strata[k], len(chosen[k]), extra[i], per_trial)
    print(f"[campaign] allocate {spec.allocate}: {sum(extra):,} more injections to {sum(e > 0 for e in extra)} strata",
          flush=True)
    last = run_campaign(spec, resolved=plan, only=[t for v in chosen.values() for t in v], **kwargs)
    outcome = dataclasses.replace(last, seconds=outcome.seconds + last.seconds,
                                  injections=outcome.injections + last.injections,
                                  launched=outcome.launched + last.launched)
    states = pooled_states(plan.directory, {k: v for k, v in chosen.items() if v}, spec.confidence)
    rounds.append({"round": 2, "name": spec.allocate, "images": dict(zip(map(_name, keys), extra)),
                   "complete": outcome.complete})
    _record_allocation(plan, spec, rounds, states)
    widest = max(s.half_width for s in states.values())
    print(f"[campaign] allocate {spec.allocate}: {spec.budget:,} injections over {len(keys)} strata; widest "
          f"+/-{100 * widest:.3f} pp ({100 * spec.confidence:g}% confidence sequence)", flush=True)
    return outcome


def _name(key: tuple) -> str:
    return "/".join(map(str, key))


def _record_allocation(plan, spec, rounds: list, states: dict) -> None:
    record = {"method": "allocate", "allocate": spec.allocate, "budget": spec.budget, "pilot": spec.pilot,
              "confidence": spec.confidence, "rounds": rounds,
              "strata": [{"kind": s.key[0], "site": s.key[1], "bit": s.key[2], "fault": s.key[3],
                          "mismatches": s.mismatches, "golden_correct": s.golden_correct, "trials": s.trials,
                          "low": s.low, "high": s.high} for s in states.values()]}
    storage.write_bytes(storage.join(plan.directory, SFI_FILE), json.dumps(record, indent=2).encode())
