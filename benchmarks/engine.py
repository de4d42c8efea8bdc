"""Engine throughput, side by side in one process on the same inputs and batch size:
clean inference images/s, fast-engine neuron and weight injections/s, and the seed's
PyTorchFI + bitstring procedure (trainables.reference) injections/s.

    python benchmarks/engine.py --model torchvision:resnet18 --batch-size 256

Random inputs (3x32x32 unless --input-shape) (throughput does not depend on them). Weight
faults use images_per_weight_fault = batch size, so both run one forward per batch.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainables import engine  # noqa: E402
from trainables.models import load_model  # noqa: E402
from trainables.reference import reference_run  # noqa: E402
from trainables.sites import select_sites  # noqa: E402


def spread(items: list, k: int) -> list:
    """k items evenly spaced over ``items`` (all of them when k >= len)."""
    if k >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else [items[len(items) // 2]]


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def clean_pass(bench: engine.Workbench) -> None:
    with engine.math_mode(bench.mode), torch.inference_mode():
        for lo in range(0, bench.num_images, bench.batch_size):
            bench.model(bench.images[lo : lo + bench.batch_size]).argmax(dim=1)


def measure(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = load_model(args.model, num_classes=10)
    g = torch.Generator().manual_seed(0)
    shape = tuple(int(d) for d in args.input_shape.split("x"))
    images = torch.randn(args.images, *shape, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    bench = engine.prepare(model, (images, labels), mode=args.mode, batch_size=args.batch_size, device=device)
    neuron_sites = spread(select_sites(bench.sites, "neuron"), args.sites)
    weight_sites = spread(select_sites(bench.sites, "weight"), args.sites)

    def neuron_round():
        for i, site in enumerate(neuron_sites):
            engine.run_faults(bench, site, "neuron", "random", seed=i)

    def weight_round():
        for i, site in enumerate(weight_sites):
            engine.run_faults(bench, site, "weight", "random", seed=i, images_per_weight_fault=args.batch_size)

    clean_pass(bench), neuron_round(), weight_round()  # warm-up (cuDNN autotune, allocator)
    clean_t, neuron_t, weight_t = [], [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits all three alike
        clean_t.append(timed(lambda: clean_pass(bench), device))
        neuron_t.append(timed(neuron_round, device))
        weight_t.append(timed(weight_round, device))
    n = bench.num_images
    ref_images = images[: args.reference_images]
    ref_site = neuron_sites[len(neuron_sites) // 2]
    ref_t = timed(lambda: reference_run(bench.model, ref_images, ref_site, "neuron", "random", 0, args.batch_size, mode=args.mode), device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": args.model,
        "batch_size": args.batch_size,
        "mode": args.mode,
        "images": n,
        "neuron_sites": [s.index for s in neuron_sites],
        "weight_sites": [s.index for s in weight_sites],
        "clean_img_s": n / statistics.median(clean_t),
        "neuron_inj_s": n * len(neuron_sites) / statistics.median(neuron_t),
        "weight_inj_s": n * len(weight_sites) / statistics.median(weight_t),
        "reference_inj_s": len(ref_images) / ref_t,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="torchvision:resnet18", help="model string (random weights are fine)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--input-shape", default="3x32x32", help="CxHxW of the random inputs (demo models: 1x28x28)")
    parser.add_argument("--images", type=int, default=2048, help="images per measured pass")
    parser.add_argument("--mode", default="fp32", choices=list(engine.MATH_MODES))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--sites", type=int, default=4, help="neuron and weight sites measured, spread over the network")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-images", type=int, default=512)
    args = parser.parse_args(argv)
    result = measure(args)
    result["neuron_vs_clean"] = result["neuron_inj_s"] / result["clean_img_s"]
    result["weight_vs_clean"] = result["weight_inj_s"] / result["clean_img_s"]
    result["engine_vs_reference"] = min(result["neuron_inj_s"], result["weight_inj_s"]) / result["reference_inj_s"]
    print(f"{result['model']} on {result['device']}, {result['mode']}, batch {result['batch_size']}, {result['images']} images")
    print(f"{'measure':<28}{'per s':>12}{'vs clean':>10}")
    for key, label in [("clean_img_s", "clean inference (img)"), ("neuron_inj_s", "neuron injections"),
                       ("weight_inj_s", "weight injections"), ("reference_inj_s", "seed procedure (PyTorchFI)")]:
        print(f"{label:<28}{result[key]:>12.0f}{result[key] / result['clean_img_s']:>10.3f}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
