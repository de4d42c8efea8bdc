"""The same campaign twice on one machine: trials driven directly through the engine in one
process, then as a Ray Tune campaign. Prints campaign_inj_s / engine_inj_s (the ``ratio``
key of the last line's JSON); the target is >= 0.8.

    python benchmarks/campaign.py                     # demo:vgg, every neuron site x bits 0-31: 544 trials
    python benchmarks/campaign.py --out s3://bucket/prefix   # the campaign to S3 (AWS_* env), then to a local folder
    python benchmarks/campaign.py --bits random,30,22  # 51 trials: a quick run, dominated by the fixed start
    python benchmarks/campaign.py --no-ray --device cuda --model torchvision:resnet18 \
        --dataset synthetic:3x32x32:10:10000          # GPU box without Ray: trials vs clean

The default is the study's per-layer, per-bit campaign (10,000 images per trial, about 4
minutes of trials on 2 CPU cores). A campaign pays a fixed start that the direct run does
not (Tune, its worker processes, torch imported and the golden pass run in each: about 9 s
here); on a campaign of a few seconds that start is what the ratio measures.

Without Ray (or with --no-ray) only the direct trials run, and the JSON compares their
injections/s (after the one-off setup: model load, golden pass) with clean inference
images/s on the same device and batch size (``trials_vs_clean``). ``engine_inj_s``, the
base of ``ratio``, includes the setup, as each Ray worker pays it too.

``--prefix`` measures prefix reuse instead: a full-layer neuron campaign (every neuron site,
one seed, bits 0-31) through the trial function twice, with and without prefix reuse, beside
clean inference, in one process. It prints injections/s over clean images/s for both; the
last line's JSON has model, device, clean_img_s, full_inj_s, prefix_inj_s, full_vs_clean,
prefix_vs_clean (and whether both paths gave identical counts)::

    python benchmarks/campaign.py --prefix --model demo:vgg --images 1024
    python benchmarks/campaign.py --prefix --model chenyaofo:cifar10_resnet20 --hub-dir ZOO --weights none \
        --dataset synthetic:3x32x32:10:10000 --images 256
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from campaign.spec import CampaignSpec, resolve  # noqa: E402
from trainables import storage  # noqa: E402
from trainables import trial as trial_mod  # noqa: E402
from trainables.inject.engine import math_mode  # noqa: E402
from trainables.trial import CampaignSettings, TrialPoint, run_trial  # noqa: E402


def direct(spec: CampaignSpec, device: str, out: Path) -> tuple[int, float, float, float, int, str]:
    """Run every trial of ``spec`` in this process: (injections, seconds in all, of which setup,
    clean img/s, trials, device)."""
    plan = resolve(spec)
    settings = CampaignSettings(name="direct", directory=str(out), model=spec.model, dataset=plan.dataset,
                                weights=spec.weights, images=spec.images, mode=spec.dtype, batch_size=spec.batch_size,
                                record=spec.record, report_every=spec.report_every, cpus_per_trial=os.cpu_count() or 1)
    gpus = [0] if device == "cuda" else []
    start = time.perf_counter()
    bench, _ = trial_mod.workbench(settings, trial_mod.pick_device(gpus)[0])  # load, golden pass (once per worker)
    setup = time.perf_counter() - start
    injections = sum(run_trial(settings, TrialPoint(t.kind, t.site, t.bit, t.seed), assigned_gpus=gpus)["images"]
                     for t in plan.trials)
    seconds = time.perf_counter() - start
    sync = torch.cuda.synchronize if bench.device.type == "cuda" else (lambda: None)
    with math_mode(bench.mode), torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            for lo in range(0, bench.num_images, bench.batch_size):
                bench.model(bench.images[lo : lo + bench.batch_size]).argmax(1)
        sync()
        clean = 3 * bench.num_images / (time.perf_counter() - t0)
    return injections, seconds, setup, clean, len(plan.trials), str(bench.device)


def breakdown(outcome, started: float) -> dict:
    """Where a campaign's time went, from its trial rows: seconds from the campaign's start to
    its first trial's start (checks, Tune's and the workers' start-up and imports; a worker's
    setup, data, model and golden pass, is in its first trial), the trials' mean wall time
    (before their writes), and seconds from the last trial's end to the campaign's end (Tune's
    end, the final check of the files, aggregation)."""
    trials = storage.read_table(storage.join(outcome.directory, "trials.parquet"),
                                columns=["started_at", "wall_s", "worker"]).to_pydict()
    ends = [a + w for a, w in zip(trials["started_at"], trials["wall_s"])]
    return {"first_trial_s": min(trials["started_at"]) - started, "trial_wall_s": sum(trials["wall_s"]) / len(ends),
            "after_last_trial_s": started + outcome.seconds - max(ends), "workers": len(set(trials["worker"]))}


def describe(times: dict) -> str:
    return (f"  first trial started {times['first_trial_s']:.1f} s after the campaign started; trials took "
            f"{times['trial_wall_s']:.2f} s each (mean, {times['workers']} workers); the campaign ended "
            f"{times['after_last_trial_s']:.1f} s after its last trial")


def clean_img_s(bench, repeats: int = 3) -> float:
    """Clean inference images/s over the workbench's images at its batch size."""
    sync = torch.cuda.synchronize if bench.device.type == "cuda" else (lambda: None)
    with math_mode(bench.mode), torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            for lo in range(0, bench.num_images, bench.batch_size):
                bench.model(bench.images[lo : lo + bench.batch_size]).argmax(1)
        sync()
        return repeats * bench.num_images / (time.perf_counter() - t0)


def prefix_main(args, device: str) -> dict:
    """The full-layer neuron campaign with and without prefix reuse, beside clean inference."""
    spec = CampaignSpec(model=args.model, dataset=args.dataset, hub_dir=args.hub_dir, weights=args.weights,
                        images=args.images, bits="0-31", seeds=(1,), sites=("neuron",), batch_size=args.batch_size,
                        dtype=args.dtype, record="none", report_every=args.images)
    plan = resolve(spec)
    for note in plan.notes:
        print(note)
    gpus = [0] if device == "cuda" else []
    if device == "cpu":  # the clean passes too run with the trials' thread count
        torch.set_num_threads(max(1, int(args.cpus_per_trial or os.cpu_count() or 1)))
    common = dict(model=spec.model, dataset=plan.dataset, hub_dir=spec.hub_dir, weights=spec.weights, images=spec.images,
                  mode=spec.dtype, batch_size=spec.batch_size, record="none", report_every=spec.images,
                  cpus_per_trial=args.cpus_per_trial or os.cpu_count() or 1, prefix_cache_mb=args.prefix_cache_mb)
    results, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("full", "prefix"):
            settings = CampaignSettings(name=path, directory=str(Path(tmp) / path), prefix=path == "prefix", **common)
            bench, _ = trial_mod.workbench(settings, trial_mod.pick_device(gpus)[0])  # setup, not timed
            clean_before = clean_img_s(bench)
            t0 = time.perf_counter()
            rows[path] = [run_trial(settings, TrialPoint(t.kind, t.site, t.bit, t.seed), assigned_gpus=gpus)
                          for t in plan.trials]
            seconds = time.perf_counter() - t0
            injections = sum(r["images"] for r in rows[path])
            results[path] = (injections / seconds, (clean_before + clean_img_s(bench)) / 2, str(bench.device))
            paths = sorted({r["path"] for r in rows[path]})
            print(f"{path:>6}: {len(rows[path])} trials, {injections:,} injections in {seconds:.1f} s = "
                  f"{injections / seconds:,.0f}/s (paths: {', '.join(paths)})", flush=True)
    clean = (results["full"][1] + results["prefix"][1]) / 2
    same = all(a["mismatches"] == b["mismatches"] and a["changed"] == b["changed"] and a["nonfinite"] == b["nonfinite"]
               for a, b in zip(rows["full"], rows["prefix"]))
    result = {"model": args.model, "device": results["full"][2] if device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
              "mode": args.dtype, "batch_size": args.batch_size, "images_per_trial": plan.num_images,
              "trials": len(plan.trials), "clean_img_s": clean, "full_inj_s": results["full"][0],
              "prefix_inj_s": results["prefix"][0], "full_vs_clean": results["full"][0] / clean,
              "prefix_vs_clean": results["prefix"][0] / clean, "identical_counts": same}
    print(f"clean inference {clean:,.0f} img/s; full path {result['full_inj_s']:,.0f} inj/s "
          f"({result['full_vs_clean']:.2f}x clean); prefix reuse {result['prefix_inj_s']:,.0f} inj/s "
          f"({result['prefix_vs_clean']:.2f}x clean); identical counts: {same}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo:vgg")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--bits", default="0-31", help="bits 0-31 x the 17 neuron sites of demo:vgg = 544 trials")
    parser.add_argument("--sites", default="neuron")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default=None, help="direct trials' device: cpu or cuda (default cuda if present)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--no-ray", action="store_true", help="only the direct trials (e.g. a GPU box without Ray)")
    parser.add_argument("--prefix", action="store_true", help="prefix reuse vs the full path (see above)")
    parser.add_argument("--hub-dir", default=None, help="a local copy of the chenyaofo zoo (--prefix)")
    parser.add_argument("--prefix-cache-mb", type=float, default=None, help="prefix cache budget (--prefix)")
    parser.add_argument("--out", default=None, help="where the Ray campaign writes: an object-store URI "
                        "(s3://bucket/prefix, configured by the AWS_* environment) is measured beside a local folder")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.prefix:
        return prefix_main(args, device)
    spec = CampaignSpec(model=args.model, dataset=args.dataset, weights=args.weights, images=args.images, bits=args.bits,
                        sites=tuple(args.sites.split(",")), batch_size=args.batch_size, dtype=args.dtype, record="none",
                        cpus_per_trial=args.cpus_per_trial, report_every=args.images)
    with tempfile.TemporaryDirectory() as tmp:
        injections, engine_s, setup_s, clean, trials, device_name = direct(spec, device, Path(tmp) / "direct")
        trial_inj_s = injections / (engine_s - setup_s)
        result = {"model": args.model, "device": device_name, "trials": trials, "images_per_trial": args.images,
                  "batch_size": args.batch_size, "mode": args.dtype, "engine_inj_s": injections / engine_s,
                  "setup_s": setup_s, "trial_inj_s": trial_inj_s, "clean_img_s": clean, "trials_vs_clean": trial_inj_s / clean}
        print(f"direct: {trials} trials, {injections:,} injections in {engine_s:.1f} s = {injections / engine_s:,.0f}/s; "
              f"{setup_s:.1f} s of it setup (load, golden pass), then {trial_inj_s:,.0f}/s "
              f"(clean inference {clean:,.0f} img/s on {device_name})")
        try:
            if args.no_ray:
                raise ImportError
            import ray

            from campaign.runner import run_campaign
        except ImportError:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
            return result
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
        ray_start = time.perf_counter() - t0
        name = f"campaign-{uuid.uuid4().hex[:8]}"  # a fresh campaign wherever --out points
        started = time.time()
        if args.out and storage.is_uri(args.out):  # then the same campaign to a local folder, side by side
            outcome = run_campaign(dataclasses.replace(spec, out=args.out, name=name), progress_every_s=30)
            times = breakdown(outcome, started)
            started = time.time()
            local = run_campaign(dataclasses.replace(spec, out=tmp, name=name), progress_every_s=30)
            local_times = breakdown(local, started)
            result.update(out=str(outcome.directory), local_campaign_inj_s=local.injections / local.seconds,
                          local_ratio=local.injections / local.seconds / result["engine_inj_s"],
                          **{f"local_{k}": v for k, v in local_times.items() if k != "workers"})
            print(f"campaign to {tmp}: {local.injections:,} injections in {local.seconds:.1f} s = "
                  f"{result['local_campaign_inj_s']:,.0f}/s, ratio {result['local_ratio']:.2f}")
            print(describe(local_times))
        else:
            outcome = run_campaign(dataclasses.replace(spec, out=args.out or tmp, name=name), progress_every_s=30)
            times = breakdown(outcome, started)
        ray.shutdown()
    result.update(campaign_inj_s=outcome.injections / outcome.seconds, campaign_s=outcome.seconds,
                  ray_start_s=ray_start, ratio=outcome.injections / outcome.seconds / result["engine_inj_s"])
    result.update({k: v for k, v in times.items() if k != "workers"})
    print(f"campaign to {outcome.directory}: {outcome.finished} trials, {outcome.injections:,} injections in {outcome.seconds:.1f} s = "
          f"{result['campaign_inj_s']:,.0f}/s (Ray start {ray_start:.1f} s, not counted)")
    print(describe(times))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
