"""Data at scale: a folder of generated 3x224x224 JPEGs (10 classes) read through ``folder:``
with ``--transform resize=256,crop=224,mean=..,std=..``, in memory and through the
memory-mapped uint8 cache. Each measurement runs in a fresh process:

- first preparation of the cache (decode, resize, crop, write: the driver's job, once per
  node): images/s;
- throughput: a worker (data loaded as trainables.trial loads it, the engine's golden pass,
  then full-pass neuron trials at one site, one CPU thread) on the cache and in memory, with
  torchvision's mobilenet_v3_small (random weights): injections/s, mapped / in memory;
- memory: the same worker with a tiny CNN (so that 3,000 images run quickly) at each size:
  peak RSS (VmHWM), mapped and in memory.

    python benchmarks/data.py                          # 300 and 3,000 images
    python benchmarks/data.py --sizes 100,400 --trials 1

The last line is one JSON object: prep_img_s per size, mapped_vs_memory_inj (goal >= 0.9),
rss_growth_mapped = peak RSS at the largest size / at the smallest (goal <= 1.1), and the
ImageNet-val estimate (50,000 images at 3x224x224) from the measured preparation rate.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRANSFORM = "resize=256,crop=224,mean=0.485,0.456,0.406,std=0.229,0.224,0.225"
DISTINCT = 100  # distinct generated JPEGs; the folder repeats them (decoding costs the same)


def generate(directory: Path, count: int) -> None:
    """``count`` 3x224x224 JPEGs (quality 90, smooth random content) in 10 class folders."""
    import torch
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(0)
    encoded = []
    for _ in range(min(count, DISTINCT)):
        coarse = torch.rand(1, 3, 14, 14, generator=g)
        image = torch.nn.functional.interpolate(coarse, size=(224, 224), mode="bilinear", align_corners=False)[0]
        image = (image * 200 + torch.rand(3, 224, 224, generator=g) * 55).clamp(0, 255).to(torch.uint8)
        encoded.append(encode_jpeg(image, quality=90).numpy().tobytes())
    for c in range(10):
        (directory / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (directory / f"class{i % 10}" / f"img_{i:06d}.jpg").write_bytes(encoded[i % len(encoded)])


def memory_status() -> dict:
    """VmHWM (peak RSS), VmRSS, RssAnon and RssFile of this process, MiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile", "VmRSS"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def build_model(name: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    if name == "mobilenet":
        return torchvision.models.mobilenet_v3_small(num_classes=10)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 8, stride=8), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))


def worker(job: dict) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    from trainables.inject import engine
    from trainables.zoo.data import load_dataset

    import torchvision.io  # noqa: F401 - imports are not preparation time
    import torchvision.transforms.functional  # noqa: F401

    from trainables.zoo.datasets import sources

    sources()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = load_dataset(f"folder:{job['folder']}", limit=job["images"], transform=TRANSFORM, cache=job["cache"])
    if job["what"] == "prepare":
        return {"prepare_s": time.perf_counter() - t0, "images": len(data)}
    model = build_model(job["model"])
    bench = engine.prepare(model, (data.images, data.labels), "fp32", 64, "cpu")  # the golden pass, as a worker's first trial
    load_s = time.perf_counter() - t0
    site = [s for s in bench.sites if not s.container][job["site"]]
    t1 = time.perf_counter()
    injections = 0
    for seed in range(job["trials"]):
        injections += engine.run_faults(bench, site, "neuron", 30, seed, record="none").counts.images
    seconds = time.perf_counter() - t1
    return {"load_s": load_s, "inj_s": injections / seconds, "injections": injections,
            "mapped": type(bench.images).__name__ == "MappedImages", **memory_status()}


def run_job(job: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"job {job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="300,3000")
    parser.add_argument("--trials", type=int, default=2, help="trials (seeds) per throughput worker")
    parser.add_argument("--repeats", type=int, default=2, help="alternated throughput runs per path (the best counts)")
    parser.add_argument("--site", type=int, default=100, help="mobilenet_v3_small neuron site of the throughput trials")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(worker(json.loads(args.job))))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    small, large = min(sizes), max(sizes)
    results: dict = {"transform": TRANSFORM, "sizes": sizes, "trials": args.trials}
    tmp = Path(tempfile.mkdtemp(prefix="bitflip-data-bench-"))
    try:
        folder, cache = tmp / "images", tmp / "cache"
        generate(folder, large)
        source_mib = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / 2**20
        print(f"generated {large} JPEGs 3x224x224 ({source_mib:.0f} MiB)", flush=True)
        for n in sizes:
            prep = run_job({"what": "prepare", "folder": str(folder), "images": n, "cache": str(cache)})
            results[f"prep_img_s_{n}"] = n / prep["prepare_s"]
            print(f"{n} images: first preparation {prep['prepare_s']:.1f} s = {n / prep['prepare_s']:.0f} images/s", flush=True)
        base = {"what": "trials", "folder": str(folder)}
        for repeat in range(args.repeats):  # alternated, the best of each: the machine is shared
            for path in ("mapped", "memory"):
                r = run_job({**base, "images": small, "cache": str(cache) if path == "mapped" else None, "model": "mobilenet",
                             "site": args.site, "trials": args.trials})
                if r["inj_s"] > results.get(f"throughput_{path}", {}).get("inj_s", 0):
                    results[f"throughput_{path}"] = r
                print(f"throughput, {small} images, {path:6s}: {r['inj_s']:.1f} injections/s (mobilenet_v3_small, site "
                      f"{args.site}, {r['injections']} injections)", flush=True)
        for n in sizes:
            for path in ("mapped", "memory"):
                r = run_job({**base, "images": n, "cache": str(cache) if path == "mapped" else None, "model": "tiny",
                             "site": 2, "trials": 1})
                assert r["mapped"] == (path == "mapped")
                results[f"rss_{path}_{n}"] = r
                print(f"memory, {n} images, {path:6s}: load {r['load_s']:.1f} s, peak RSS {r['VmHWM']:.0f} MiB (at the end: "
                      f"anon {r['RssAnon']:.0f}, file {r['RssFile']:.0f}); tiny CNN {r['inj_s']:.0f} injections/s", flush=True)
        results["cache_bytes"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["mapped_vs_memory_inj"] = results["throughput_mapped"]["inj_s"] / results["throughput_memory"]["inj_s"]
    results["mapped_vs_memory_inj_tiny"] = {n: results[f"rss_mapped_{n}"]["inj_s"] / results[f"rss_memory_{n}"]["inj_s"]
                                            for n in sizes}
    results["rss_growth_mapped"] = results[f"rss_mapped_{large}"]["VmHWM"] / results[f"rss_mapped_{small}"]["VmHWM"]
    results["rss_growth_memory"] = results[f"rss_memory_{large}"]["VmHWM"] / results[f"rss_memory_{small}"]["VmHWM"]
    rate = results[f"prep_img_s_{large}"]
    results["imagenet_val_estimate"] = {"cache_GB": 50_000 * 3 * 224 * 224 / 1e9,
                                        "float32_in_memory_GB": 50_000 * 3 * 224 * 224 * 4 / 1e9,
                                        "prepare_minutes_at_this_rate": 50_000 / rate / 60}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
