"""Engine throughput, side by side in one process on the same inputs and batch size:
clean inference images/s, fast-engine neuron, weight and param (int8 models: qparam) injections/s, neuron
injections/s at sites whose module returns a tuple (nn.MultiheadAttention) when the model
has them, and the seed's PyTorchFI + bitstring procedure (trainables.inject.reference) injections/s.

    python benchmarks/engine.py --model torchvision:resnet18 --batch-size 256
    python benchmarks/engine.py --model torchvision:vit_b_16 --input-shape 3x224x224 --batch-size 32 --images 128 --reference-images 0
    python benchmarks/engine.py --model demo:vgg --input-shape 1x28x28 --quantize int8   # int8, CPU
    python benchmarks/engine.py --model demo:vgg --input-shape 1x28x28 --quantize int8 --kinds neuron,weight,qparam

Random inputs (3x32x32 unless --input-shape) (throughput does not depend on them). Weight
and param faults use images_per_weight_fault = batch size, so all run one forward per batch.
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

from trainables.inject import engine  # noqa: E402
from trainables.inject import protection  # noqa: E402
from trainables.inject.fault_models import parse_fault  # noqa: E402
from trainables.inject.reference import reference_run  # noqa: E402
from trainables.inject.sites import select_sites  # noqa: E402
from trainables.zoo import quantization  # noqa: E402
from trainables.zoo.models import load_model  # noqa: E402


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


def protected_bench(bench: engine.Workbench, text: str, shape: tuple[int, ...]) -> protection.ProtectedBench:
    """The workbench under ``--protect``; Ranger bounds are profiled on 512 other random inputs."""
    spec = protection.parse_protect(text)
    if spec.kind != "ranger":
        return protection.protect_bench(bench, protection.fixed_guard(spec, bench.sites))
    sites = protection.protected_sites(spec, bench.sites)
    calibration = torch.randn(512, *shape, generator=torch.Generator().manual_seed(1))
    bounds = protection.profile_bounds(bench.model, sites, calibration, bench.batch_size, bench.mode)
    return protection.protect_bench(bench, protection.Guard(spec, tuple(sites), bounds))


def measure(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = load_model(args.model, num_classes=10, weights=args.weights)
    g = torch.Generator().manual_seed(0)
    shape = tuple(int(d) for d in args.input_shape.split("x"))
    images = torch.randn(args.images, *shape, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    if args.quantize:  # int8: calibrated on other random inputs, run on the CPU (x86 backend)
        calibration = torch.randn(quantization.CALIBRATION_IMAGES, *shape, generator=torch.Generator().manual_seed(1))
        model, device = quantization.quantize_int8(model, calibration, args.model), torch.device("cpu")
    bench = engine.prepare(model, (images, labels), mode=args.mode, batch_size=args.batch_size, device=device,
                           weight_format=args.weight_format)
    neuron_sites = spread(select_sites(bench.sites, "neuron"), args.sites)
    weight_sites = spread(select_sites(bench.sites, "weight"), args.sites)
    param_sites = spread([p for p in bench.params if not p.buffer], args.sites) if not args.quantize else []
    tuple_sites = spread([s for s in select_sites(bench.sites, "neuron") if s.output_index is not None], args.sites)
    qparam_sites = spread(bench.qsites, args.sites)  # an int8 model's scales and zero points (none otherwise)

    def neuron_round():
        for i, site in enumerate(neuron_sites):
            engine.run_faults(bench, site, "neuron", "random", seed=i, fault=args.fault)

    def weight_round():
        for i, site in enumerate(weight_sites):
            engine.run_faults(bench, site, "weight", "random", seed=i, images_per_weight_fault=args.batch_size, fault=args.fault)

    def param_round():
        for i, site in enumerate(param_sites):
            engine.run_faults(bench, site, "param", "random", seed=i, images_per_weight_fault=args.batch_size, fault=args.fault)

    def qparam_round():  # one fault per batch, like weight faults; every qparam fault runs the full forward pass
        for i, site in enumerate(qparam_sites):
            engine.run_faults(bench, site, "qparam", "random", seed=i, images_per_weight_fault=args.batch_size, fault=args.fault)

    def tuple_round():
        for i, site in enumerate(tuple_sites):
            engine.run_faults(bench, site, "neuron", "random", seed=i, fault=args.fault)

    guarded = protected_bench(bench, args.protect, shape) if args.protect != "none" else None

    def protected_round():  # each fault through the unprotected and the protected model (paired trials)
        for i, site in enumerate(neuron_sites):
            protection.run_paired(guarded, site, "neuron", "random", seed=i, fault=args.fault)

    kinds = {"neuron": neuron_round, "weight": weight_round, "param": param_round, "tuple_neuron": tuple_round,
             "qparam": qparam_round}
    rounds = {"clean": lambda: clean_pass(bench)}
    rounds.update({k: run for k, run in kinds.items() if k in args.kinds.split(",") and (k != "tuple_neuron" or tuple_sites)
                   and (k != "qparam" or qparam_sites)})
    if guarded is not None:
        rounds["protected_neuron"] = protected_round
    for run in rounds.values():  # warm-up (cuDNN autotune, allocator)
        run()
    times: dict[str, list[float]] = {name: [] for name in rounds}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits all alike
        for name, run in rounds.items():
            times[name].append(timed(run, device))
    n = bench.num_images
    per_round = {"neuron": len(neuron_sites), "weight": len(weight_sites), "param": len(param_sites),
                 "tuple_neuron": len(tuple_sites), "protected_neuron": len(neuron_sites), "qparam": len(qparam_sites)}
    rates = {f"{name}_inj_s": n * per_round[name] / statistics.median(t) for name, t in times.items() if name != "clean"}
    ref_images = images[: args.reference_images if not args.quantize else 0]  # PyTorchFI cannot run int8 models
    ref_site = neuron_sites[len(neuron_sites) // 2] if neuron_sites else None
    ref_t = timed(lambda: reference_run(bench.model, ref_images, ref_site, "neuron", "random", 0, args.batch_size, mode=args.mode),
                  device) if len(ref_images) else float("nan")
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": args.model,
        "batch_size": args.batch_size,
        "mode": args.mode,
        "fault": args.fault,
        "protect": args.protect,
        "weight_format": args.weight_format,
        "images": n,
        "neuron_sites": [s.index for s in neuron_sites],
        "weight_sites": [s.index for s in weight_sites],
        "param_sites": [p.name for p in param_sites],
        "tuple_neuron_sites": [s.index for s in tuple_sites],
        "qparam_sites": [s.name for s in qparam_sites],
        "clean_img_s": n / statistics.median(times["clean"]),
        **rates,
        "reference_inj_s": len(ref_images) / ref_t,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="torchvision:resnet18", help="model string (random weights are fine)")
    parser.add_argument("--weights", default=None, help="a state_dict file, or none for random weights (default: the model's own)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--input-shape", default="3x32x32", help="CxHxW of the random inputs (demo models: 1x28x28)")
    parser.add_argument("--images", type=int, default=2048, help="images per measured pass")
    parser.add_argument("--mode", default="fp32", choices=list(engine.MATH_MODES))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--sites", type=int, default=4, help="sites of each kind measured, spread over the network")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", default="neuron,weight,param,tuple_neuron",
                        help="what to measure beside clean inference (tuple_neuron: sites on tuple outputs, if any; "
                             "qparam: an int8 model's scales and zero points, with --quantize int8)")
    parser.add_argument("--reference-images", type=int, default=512, help="images for the seed's procedure (0: skip it)")
    parser.add_argument("--fault", default="flip", help="fault model of the engine's injections: flip (default), flip:K, "
                                                        "burst:K, stuck0, stuck1, random, zero (the seed's procedure always flips)")
    parser.add_argument("--protect", default="none", help="also measure paired protected neuron injections (each fault "
                                                          "through the model without and with it): clamp:<types>:<lo>:<hi>, "
                                                          "relu6, ranger[:<targets>]")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="int8: measure the post-training-quantized model (CPU, x86 backend; no seed procedure)")
    parser.add_argument("--weight-format", choices=["fp8_e4m3fn", "fp8_e5m2"], default=None,
                        help="store the weights in fp8 (upcast for compute), clean inference included")
    args = parser.parse_args(argv)
    if args.quantize:
        args.mode = "int8"
    try:
        args.fault = str(parse_fault(args.fault))
    except ValueError as exc:
        parser.error(str(exc))
    result = measure(args)
    for kind in ("neuron", "weight", "param", "tuple_neuron", "protected_neuron", "qparam"):
        if f"{kind}_inj_s" in result:
            result[f"{kind}_vs_clean"] = result[f"{kind}_inj_s"] / result["clean_img_s"]
    if "protected_neuron_inj_s" in result and "neuron_inj_s" in result:  # 0.5 = the cost of two faulty passes
        result["protected_vs_neuron"] = result["protected_neuron_inj_s"] / result["neuron_inj_s"]
    engine_rates = [result[k] for k in ("neuron_inj_s", "weight_inj_s") if k in result]
    result["engine_vs_reference"] = min(engine_rates) / result["reference_inj_s"] if engine_rates else float("nan")
    print(f"{result['model']} on {result['device']}, {result['mode']}"
          f"{', weights ' + args.weight_format if args.weight_format else ''}, batch {result['batch_size']}, "
          f"{result['images']} images, fault model {result['fault']}")
    print(f"{'measure':<28}{'per s':>12}{'vs clean':>10}")
    for key, label in [("clean_img_s", "clean inference (img)"), ("neuron_inj_s", "neuron injections"),
                       ("tuple_neuron_inj_s", "neuron, tuple outputs"), ("weight_inj_s", "weight injections"),
                       ("param_inj_s", "param injections"), ("qparam_inj_s", "qparam injections (int8)"),
                       ("protected_neuron_inj_s", f"paired, {result['protect']}"), ("reference_inj_s", "seed procedure (PyTorchFI)")]:
        if key not in result:
            continue
        rate = f"{result[key]:>12,.0f}" if result[key] >= 100 else f"{result[key]:>12.3g}"
        print(f"{label:<28}{rate}{result[key] / result['clean_img_s']:>10.3f}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
