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
