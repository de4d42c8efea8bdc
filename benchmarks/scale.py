"""Does a campaign's cost per trial stay flat as it grows? Runs campaigns of tiny trials (demo:vgg,
every neuron site x bits 0-31 x S seeds = 544 S trials, 64 images each, no per-fault rows) at
several sizes, each as its own driver process, and prints per size: the driver's peak RSS, the
largest size Tune's state (the campaign's ray/ folder) reached, the campaign directory's size,
and trials/s in each tenth of the campaign (from the commit markers' times). Then a dry run of
the driver's planning and bookkeeping alone at --dry-trials trials (no Ray, no injections):
resolve, the pending trials, waves, Tune's search over one wave, and the commit bookkeeping, for
the lazy plan and, in another process, the plan built up front as before (side by side).

    python benchmarks/scale.py --seeds 4,37        # 2,176 and 20,128 trials (about 20 min on 2 cores)
    python benchmarks/scale.py --seeds 1 --dry-trials 1000000

Goals (issue 23): RSS and Tune state at the largest size within 10% of the smallest; trials/s in
the last tenth at least 90% of the first full tenth (the first tenth includes the start).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def folder_bytes(path: Path) -> int:
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total


def status_bytes(pid: int, field: str) -> int:
    """A memory field of a live process's /proc status (VmHWM: peak RSS, VmRSS: now), in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss(pid: int) -> int:
    return status_bytes(pid, "VmHWM")


def run_size(seeds: int, out: Path, wave_size: int | None, extra: list[str]) -> dict:
    name = f"scale-{seeds}"
    args = [sys.executable, "-m", "campaign", "run", "--model", "demo:vgg", "--weights", "none", "--sites", "neuron",
            "--bits", "0-31", "--images", "64", "--batch-size", "64", "--record", "none", "--num-seeds", str(seeds),
            "--out", str(out), "--name", name, *extra]
    if wave_size:
        args += ["--wave-size", str(wave_size)]
    directory = out / name
    started = time.monotonic()
    log = open(out / f"{name}.log", "w")
    driver = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    rss = state = 0
    trace = open(out / f"{name}-rss.csv", "w")  # the driver's RSS against the trials committed, every 2 s
    trace.write("seconds,trials_committed,driver_rss_mb\n")
    while driver.poll() is None:
        rss = max(rss, peak_rss(driver.pid))
        state = max(state, folder_bytes(directory / "ray") if (directory / "ray").exists() else 0)
        done = directory / "parts" / "done"
        committed = sum(1 for _ in done.iterdir()) if done.exists() else 0
        trace.write(f"{time.monotonic() - started:.0f},{committed},{status_bytes(driver.pid, 'VmRSS') / 2**20:.0f}\n")
        trace.flush()
        time.sleep(2.0)
    trace.close()
    seconds = time.monotonic() - started
    if driver.returncode != 0:
        raise SystemExit(f"size {seeds}: the campaign failed ({driver.returncode}); see {out / name}.log")
    times = sorted(p.stat().st_mtime for p in (directory / "parts" / "done").glob("*.json"))
    tenth = len(times) // 10
    rates = []
    for i in range(10):
        chunk = times[i * tenth: (i + 1) * tenth + 1]  # the boundaries of a tenth: its first to the next's first
        span = chunk[-1] - chunk[0] if len(chunk) > 1 else 0
        rates.append(round(tenth / span, 2) if span > 0 else None)
    return {"trials": len(times), "seconds": round(seconds, 1), "driver_peak_rss_mb": round(rss / 2**20),
            "tune_state_peak_mb": round(state / 2**20, 2), "tune_state_end_mb": round(folder_bytes(directory / "ray") / 2**20, 2),
            "campaign_dir_mb": round(folder_bytes(directory) / 2**20, 1), "trials_per_s_by_tenth": rates}


def dry_run(trials: int, wave_size: int, eager: bool = False) -> dict:
    """The driver's planning and bookkeeping at ``trials`` trials, with no Ray and no trials run,
    as _run_campaign does them: the plan kept lazy (campaign.grid), each wave taken from it in
    turn. ``eager``: as before the lazy plan, every TrialPlan built up front, a key -> trial dict
    and the pending list (the old driver's code, kept here to measure against)."""
    import dataclasses
    import itertools

    from campaign.grid import distinct_trials, pending_trials
    from campaign.runner import trial_points, wave_slices
    from campaign.spec import CampaignSpec, resolve
    from trainables.results import NO_PARTS, CommitWatch, trial_key

    seeds = -(-trials // 544)
    started = time.monotonic()
    spec = CampaignSpec(model="demo:vgg", weights="none", sites=("neuron",), bits="0-31", images=64, batch_size=64,
                        record="none", num_seeds=seeds, out=tempfile.mkdtemp(prefix="scale-dry-"), name="dry")
    plan = resolve(spec)
    plan = dataclasses.replace(plan, trials=plan.trials[:trials])
    if eager:
        plan = dataclasses.replace(plan, trials=tuple(plan.trials))
    resolved_s = time.monotonic() - started
    finished: frozenset = frozenset()  # a fresh campaign
    if eager:  # as _run_campaign did before the lazy plan
        wanted = {trial_key(t.kind, t.site, t.bit, t.seed, t.fault): t for t in plan.trials}
        pending = [t for key, t in wanted.items() if key not in finished]
        waves = wave_slices(len(pending), wave_size)
        for number, (first, stop) in enumerate(waves):
            wave = pending[first:stop]
            keys = [trial_key(t.kind, t.site, t.bit, t.seed, t.fault) for t in wave]
            if number == 0:
                search = trial_points(wave, None)  # Tune's search over one wave
    else:
        trials_, wanted = distinct_trials(plan.trials)
        waves = wave_slices(len(wanted) - len(finished), wave_size)
        to_run = pending_trials(trials_, finished)
        for number, (first, stop) in enumerate(waves):
            keys, wave = zip(*itertools.islice(to_run, stop - first))
            if number == 0:
                search = trial_points(wave, None)
    del wave, keys
    watch = CommitWatch(spec.directory)
    for key in wanted:  # the driver's record of verified trials (past KEEP_PARTS: the key alone)
        watch._verified[key] = {} if eager else NO_PARTS  # before: an empty dict per trial
    done = watch.results()
    seconds = time.monotonic() - started
    shutil.rmtree(spec.out, ignore_errors=True)
    del search, done
    return {"plan": "eager (before)" if eager else "lazy", "dry_trials": len(wanted), "waves": len(waves),
            "resolve_s": round(resolved_s, 1), "total_s": round(seconds, 1),
            "peak_rss_mb": round(peak_rss(os.getpid()) / 2**20)}  # VmHWM: not the parent's peak, as ru_maxrss can be


def dry_runs(trials: int, wave_size: int) -> list[dict]:
    """dry_run of the eager and the lazy plan, each in a fresh process (its own peak RSS), in turn."""
    rows = []
    for mode in ("eager", "lazy"):
        out = subprocess.run([sys.executable, __file__, "--seeds", "", "--dry-trials", str(trials), "--wave-size",
                              str(wave_size), "--dry-mode", mode], cwd=ROOT, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="4,37", help="seeds per size (544 trials each), e.g. 4,37")
    parser.add_argument("--wave-size", type=int, help="--wave-size of the campaigns (default: the runner's)")
    parser.add_argument("--dry-trials", type=int, default=1_000_000, help="trials of the dry run (0: none)")
    parser.add_argument("--out", help="where the campaigns go (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the campaign directories")
    parser.add_argument("--dry-mode", choices=("eager", "lazy"), help=argparse.SUPPRESS)  # one dry run, in this process
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="scale-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seeds in [int(s) for s in args.seeds.split(",") if s]:
        row = run_size(seeds, out, args.wave_size, extra)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(out / f"scale-{seeds}", ignore_errors=True)
    print("| trials | s | driver peak RSS | Tune state peak (end) | campaign dir | trials/s, first full tenth -> last |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rates = r["trials_per_s_by_tenth"]
        print(f"| {r['trials']:,} | {r['seconds']} | {r['driver_peak_rss_mb']} MB | {r['tune_state_peak_mb']} MB "
              f"({r['tune_state_end_mb']} MB) | {r['campaign_dir_mb']} MB | {rates[1]} -> {rates[-1]} |")
    if len(rows) > 1:
        small, large = rows[0], rows[-1]
        print(f"RSS {large['trials']:,} / {small['trials']:,} trials: {large['driver_peak_rss_mb'] / small['driver_peak_rss_mb']:.2f}; "
              f"Tune state: {large['tune_state_peak_mb'] / max(small['tune_state_peak_mb'], 1e-9):.2f}; "
              f"last tenth / first full tenth at {large['trials']:,}: "
              f"{(large['trials_per_s_by_tenth'][-1] or 0) / (large['trials_per_s_by_tenth'][1] or 1):.2f}")
    wave_size = args.wave_size or __import__("campaign.runner").runner.DEFAULT_WAVE_SIZE
    if args.dry_trials and args.dry_mode:
        print(json.dumps(dry_run(args.dry_trials, wave_size, eager=args.dry_mode == "eager")), flush=True)
    elif args.dry_trials:
        rows = dry_runs(args.dry_trials, wave_size)
        for row in rows:
            print(json.dumps(row), flush=True)
        print("| plan | trials | waves | resolve s | total s | peak RSS |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['plan']} | {r['dry_trials']:,} | {r['waves']} | {r['resolve_s']} | {r['total_s']} | "
                  f"{r['peak_rss_mb']} MB |")
    if not args.out and not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
