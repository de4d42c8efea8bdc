"""Savings of stopping each stratum at a margin, by resampling a reference campaign.

The reference (every neuron site x bits 0-31 of demo:vgg over the whole test split; make it once,
it stays out of the repository):

    python -m campaign run --sites neuron --bits all --record none --out /tmp/runs --name ref

Each stratum's reference rate is taken as the truth; ``--runs`` simulated campaigns per stratum
draw its faults (Bernoulli at that rate: resampling the reference's outcomes with replacement),
look after every window of ``--look`` counted injections (--report-every 2048 images of which the
golden-correct ones count) and stop once the anytime-valid interval (trainables.sfi) is no wider
than +/- ``--margin`` at ``--confidence``, as ``run --margin`` does. Prints the injections spent
against the uniform p = 0.5 plan (Leveugle 2009 per stratum) and the simulated coverage.

    python scripts/sfi_savings.py /tmp/runs/ref --margin 0.01 --confidence 0.99 --runs 1000
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import analysis.sfi as S  # noqa: E402
from trainables import sfi  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="the reference campaign directory")
    parser.add_argument("--margin", type=float, default=0.01)
    parser.add_argument("--confidence", type=float, default=0.99)
    parser.add_argument("--runs", type=int, default=1000, help="simulated campaigns per stratum")
    parser.add_argument("--look", type=int, default=0, help="counted injections between looks (default: 2048 images "
                                                             "times the reference's golden-correct share)")
    parser.add_argument("--max-seeds", type=int, default=20, help="the most trials (data set passes) per stratum")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    table = S.strata(args.reference, args.confidence)
    sizes = S.site_sizes(args.reference)
    per_trial = int(round(table["golden_correct"].sum() / table["trials"].sum()))
    images = int(round(table["images"].sum() / table["trials"].sum()))
    look = args.look or int(2048 * per_trial / images)
    largest = args.max_seeds * per_trial
    rates = (table["mismatches"] / table["golden_correct"]).to_numpy()
    populations = [sizes[(str(r.kind), int(r.site_index))][1] * S._bits_in(r.bit_spec) * per_trial
                   for r in table.itertuples()]
    uniform = [sfi.leveugle_sample_size(N, args.margin, args.confidence, 0.5) for N in populations]
    cache: dict[float, sfi.StoppingResult] = {}
    spent, covered, worst, reached = 0.0, 0, 1.0, 0
    for i, rate in enumerate(rates):
        if rate not in cache:
            cache[rate] = sfi.simulate_stopping(float(rate), args.runs, look, largest, args.margin + 1e-12,
                                                args.confidence, args.seed + i)["cs"]
        result = cache[rate]
        spent += min(result.mean_injections, populations[i])
        covered += result.covered
        reached += result.stopped_early  # stopped at the margin before the cap on trials
        worst = min(worst, result.covered / result.runs)
    total_uniform = sum(uniform)
    print(f"reference {args.reference}: {len(rates)} strata, {per_trial:,} counted injections per trial, rates "
          f"{np.min(rates):.4f}..{np.max(rates):.4f}; {int((rates > 0.05).sum())} strata above 5%")
    print(f"rule: stop at +/-{100 * args.margin:g} pp, {100 * args.confidence:g}% confidence sequence, looks every "
          f"{look:,} counted injections, at most {args.max_seeds} trials per stratum; {args.runs:,} runs per stratum")
    print(f"uniform p = 0.5 plan (Leveugle): {total_uniform:,} injections; stopping at the margin spends "
          f"{spent:,.0f} on average = {100 * spent / total_uniform:.1f}% of it")
    print(f"coverage of the reference rate: {covered / (args.runs * len(rates)):.5f} over all strata, "
          f"{worst:.4f} in the worst stratum (nominal {args.confidence}); {reached / (args.runs * len(rates)):.5f} of the "
          f"stratum runs reached the margin before the cap")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
