"""The prefix ladder (trainables.inject.suffix) on and off, side by side in one process: one
trial (one bit) per neuron site in site order by default, which is where building each
site's prefix costs the most. Prints seconds per pass over all sites, the prefix batches computed from the
images and bridged, and whether every count was identical; the last line is JSON.

    OMP_NUM_THREADS=1 python benchmarks/ladder.py --model demo:vgg --images 2048
    OMP_NUM_THREADS=1 python benchmarks/ladder.py --images 10000 --bits random,30,22 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from trainables.inject import engine, suffix
from trainables.zoo.data import load_dataset
from trainables.zoo.models import load_model


def one_pass(bench, ladder: bool, bits: list) -> tuple[float, list, tuple[int, int]]:
    """Every neuron site in order, one trial per bit, on a fresh prefix state: (seconds, counts,
    (from images, bridged))."""
    bench.prefix_state = suffix.PrefixState(bench.prefix_cache_mb, ladder=ladder)
    t0 = time.perf_counter()
    counts = [engine.run_faults(bench, site, "neuron", bit, seed=1).counts.by_bit.tolist()
              for site in bench.sites for bit in bits]
    seconds = time.perf_counter() - t0
    stats = bench.prefix_state.stats
    return seconds, counts, (stats.from_images, stats.bridged)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo:vgg")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bits", default="30", help="one trial per bit and site (benchmarks/campaign.py: random,30,22)")
    args = parser.parse_args(argv)
    bits = [b if b == "random" else int(b) for b in args.bits.split(",")]
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, limit=args.images)
    bench = engine.prepare(load_model(args.model, num_classes=data.num_classes), (data.images, data.labels),
                           batch_size=args.batch_size, device="cpu", prefix=True)
    times: dict[bool, list[float]] = {True: [], False: []}
    counts, work = {}, {}
    for _ in range(args.repeats):
        for ladder in (False, True):
            seconds, counts[ladder], work[ladder] = one_pass(bench, ladder, bits)
            times[ladder].append(seconds)
    best = {k: min(v) for k, v in times.items()}
    result = {"model": args.model, "images": args.images, "batch_size": args.batch_size, "sites": len(bench.sites), "bits": args.bits,
              "threads": args.threads, "plain_s": best[False], "ladder_s": best[True],
              "plain_s_all": times[False], "ladder_s_all": times[True], "speedup": best[False] / best[True],
              "plain_from_images": work[False][0], "ladder_from_images": work[True][0],
              "ladder_bridged": work[True][1], "identical_counts": counts[True] == counts[False]}
    print(f"{len(bench.sites)} sites x {len(bits)} trials of {args.images} images: without the ladder {best[False]:.2f} s "
          f"({work[False][0]} prefix batches from the images), with it {best[True]:.2f} s ({work[True][0]} from the "
          f"images, {work[True][1]} bridged): {result['speedup']:.2f}x; identical counts: {result['identical_counts']}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
