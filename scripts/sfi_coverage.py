"""Coverage of the intervals a campaign that stops at a margin reports, by simulation.

For each true rate, ``--runs`` simulated campaigns draw Bernoulli faults, look after every window
(the tool's schedules: a trial's ``--target-margin`` looks every ``--report-every`` images of its
data set; a campaign's ``--margin`` looks after every round of one trial per stratum) and stop at the
first look whose interval is narrower than the margin. Two margins per rate: the half-width the
confidence sequence reaches at half the largest sample ("cs@half": both intervals stop early), and
the one Wilson's interval reaches there ("wilson@half": the stop is decided by the luck of the
draws, where repeated checks of an ordinary interval do worst). Prints, per rate, how often the interval at the stop covers the true rate: the confidence sequence
(trainables.sfi) and the Wilson interval checked at every look (what --target-margin did before).

    python scripts/sfi_coverage.py                       # 10,000 runs per rate, both schedules
    python scripts/sfi_coverage.py --confidence 0.99 --runs 20000
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables import sfi  # noqa: E402
from trainables.stats import wilson_interval  # noqa: E402

SCHEDULES = {  # name: (injections between looks, largest sample)
    "trial": (2048, 10_000),  # --target-margin: --report-every 2048 over a 10,000-image data set
    "campaign": (9_178, 20 * 9_178),  # --margin: rounds of one demo:vgg trial (9,178 golden-correct images), 20 seeds
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--rates", default="0.001,0.01,0.1,0.5")
    parser.add_argument("--schedules", default="trial,campaign")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"{'schedule':>9} {'rate':>6} {'margin from':>12} {'margin':>9} {'CS covers':>10} {'CS stops early':>15} {'CS mean n':>10} "
          f"{'Wilson covers':>14} {'Wilson misses':>14} {'Wilson mean n':>14}")
    worst = 1.0
    for schedule in args.schedules.split(","):
        look, largest = SCHEDULES[schedule]
        for rate in map(float, args.rates.split(",")):
            for source in ("cs@half", "wilson@half"):
                worst = min(worst, _row(schedule, rate, source, look, largest, args))
    print(f"lowest coverage of the confidence sequence: {worst:.4f} (nominal {args.confidence})")
    return 0 if worst >= args.confidence else 1


def _row(schedule: str, rate: float, source: str, look: int, largest: int, args) -> float:
    """Simulate one (schedule, rate, margin) cell, print its line, return the CS's coverage."""
    half = largest // 2
    if source == "cs@half":
        low, high = sfi.confidence_sequence(round(rate * half), half, args.confidence)
    else:
        low, high = wilson_interval(round(rate * half), half, sfi.z_quantile(args.confidence))
    margin = (high - low) / 2
    out = sfi.simulate_stopping(rate, args.runs, look, largest, margin, args.confidence, args.seed)
    cs, wilson = out["cs"], out["wilson"]
    print(f"{schedule:>9} {rate:>6} {source:>12} {margin:>9.5f} {cs.covered / cs.runs:>10.4f} "
          f"{cs.stopped_early / cs.runs:>15.3f} {cs.mean_injections:>10,.0f} {wilson.covered / wilson.runs:>14.4f} "
          f"{1 - wilson.covered / wilson.runs:>14.4f} {wilson.mean_injections:>14,.0f}")
    return cs.covered / cs.runs


if __name__ == "__main__":
    raise SystemExit(main())
