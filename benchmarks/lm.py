"""Teacher-forced LM campaigns against clean inference, side by side in one process: clean
teacher-forced throughput (sequences/s of the model's forward pass), then a full-layer neuron
campaign (one trial per bit and leaf neuron site, in site order, one fault per sequence) with the
layer-boundary prefix (trainables.inject.layers) and without it. The three are interleaved
(``--repeats`` rounds, the order of the two campaigns alternating) and the medians compared, so a
shared machine's load moves all three alike. Prints faults/s of each, their ratios to clean
inference, the load average, and whether every count and sum was identical; the last line is JSON.

    OMP_NUM_THREADS=1 python benchmarks/lm.py                      # a 4-layer width-128 Llama built here
    OMP_NUM_THREADS=1 python benchmarks/lm.py --model demo:lm --seq-len 128
    OMP_NUM_THREADS=1 python benchmarks/lm.py --model hf:<dir> --sequences 128 --seq-len 64
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from trainables.inject import engine, suffix
from trainables.zoo.models import load_model


def tiny_llama(directory: Path, layers: int, width: int, vocab: int, context: int) -> str:
    """A random-weight Llama (RMSNorm, rotary, SwiGLU, GQA, untied head) saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)
    return f"hf:{directory}"


def clean_pass(bench: engine.Workbench, tries: int = 5) -> float:
    """Seconds for one clean forward pass over every sequence, in the bench's batches (median of ``tries``)."""
    seconds = []
    for _ in range(tries):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for lo in range(0, bench.num_images, bench.batch_size):
                bench.model(bench.images[lo : lo + bench.batch_size])
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def campaign(bench: engine.Workbench, bits: list, flip: int) -> tuple[dict[str, float], dict[str, list]]:
    """One trial per leaf neuron site and bit, site-major, with and without the prefix (a fresh prefix
    state), each trial next to the other path's and to one clean pass over every sequence, the order
    rotating from trial to trial: (seconds per path, results per path)."""
    bench.prefix_state = suffix.PrefixState(bench.prefix_cache_mb)
    seconds = {"clean": 0.0, "prefix": 0.0, "full": 0.0}
    results: dict[str, list] = {"prefix": [], "full": []}
    orders = [("clean", "prefix", "full"), ("full", "clean", "prefix"), ("prefix", "full", "clean")]
    for site in bench.sites:
        if site.container:
            continue
        for bit in bits:
            flip += 1
            for mode in orders[flip % 3]:
                if mode == "clean":
                    seconds["clean"] += clean_pass(bench, tries=1)
                    continue
                t0 = time.perf_counter()
                counts = engine.run_faults(bench, site, "neuron", bit, seed=1, prefix=mode == "prefix").counts
                seconds[mode] += time.perf_counter() - t0
                results[mode].append((counts.by_bit.tolist(), counts.sums.tolist()))
    return seconds, results


def campaign_rounds(bench: engine.Workbench, bits: list, flip: int) -> tuple[dict[str, float], dict[str, list]]:
    """``--interleave round``: each path's whole campaign back to back (the order alternating by round),
    between clean passes (the median of five before and five after, scaled to one pass per trial)."""
    seconds: dict[str, float] = {}
    results: dict[str, list] = {}
    clean = [clean_pass(bench, tries=1) for _ in range(5)]
    for mode in (("prefix", "full") if flip % 2 == 0 else ("full", "prefix")):
        bench.prefix_state = suffix.PrefixState(bench.prefix_cache_mb)
        t0 = time.perf_counter()
        results[mode] = []
        for site in bench.sites:
            if site.container:
                continue
            for bit in bits:
                counts = engine.run_faults(bench, site, "neuron", bit, seed=1, prefix=mode == "prefix").counts
                results[mode].append((counts.by_bit.tolist(), counts.sums.tolist()))
        seconds[mode] = time.perf_counter() - t0
    clean += [clean_pass(bench, tries=1) for _ in range(5)]
    seconds["clean"] = statistics.median(clean) * len(results["prefix"])
    return seconds, results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="hf:<dir> (default: a Llama built here from --layers/--width/--vocab)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bits", default="random", help="one trial per bit and site: random,30,22")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--interleave", choices=("trial", "round"), default="trial",
                        help="trial: each trial next to the other path's and a clean pass (default); round: each "
                             "path's whole campaign back to back, between clean passes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bits = [b if b == "random" else int(b) for b in args.bits.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        name = args.model or tiny_llama(Path(tmp) / "llama", args.layers, args.width, args.vocab, max(128, args.seq_len))
        model = load_model(name)
        windows = torch.randint(0, model.vocab_size, (args.sequences, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
        bench = engine.prepare(model, (windows[:, :-1], windows[:, 1:]), batch_size=args.batch_size, device="cpu",
                               prefix=True)
    sites = sum(1 for s in bench.sites if not s.container)
    times: dict[str, list[float]] = {"clean": [], "prefix": [], "full": []}
    results = {}
    load_before = os.getloadavg()
    for round_ in range(args.repeats):
        seconds, results = (campaign if args.interleave == "trial" else campaign_rounds)(bench, bits, round_)
        for mode, value in seconds.items():
            times[mode].append(value)
    load_after = os.getloadavg()
    runs = sites * len(bits)  # one clean pass over every sequence per trial
    ratios = {mode: [c / t for c, t in zip(times["clean"], times[mode])] for mode in ("prefix", "full")}
    best = {k: statistics.median(v) for k, v in times.items()}
    clean_rate = args.sequences * runs / best["clean"]
    faults = args.sequences * runs
    rate = {mode: faults / best[mode] for mode in ("prefix", "full")}
    identical = results["prefix"] == results["full"]
    load = f"{load_before[0]:.2f} -> {load_after[0]:.2f}"
    result = {"model": args.model or f"llama {args.layers}x{args.width} vocab {args.vocab}",
              "parameters": sum(p.numel() for p in bench.model.parameters()), "sequences": args.sequences,
              "seq_len": args.seq_len, "batch_size": args.batch_size, "sites": sites, "bits": args.bits,
              "threads": args.threads, "repeats": args.repeats, "interleave": args.interleave, "clean_seq_per_s": round(clean_rate, 1),
              "prefix_faults_per_s": round(rate["prefix"], 1), "full_faults_per_s": round(rate["full"], 1),
              "prefix_vs_clean": round(statistics.median(ratios["prefix"]), 3),
              "full_vs_clean": round(statistics.median(ratios["full"]), 3),
              "prefix_vs_clean_per_round": [round(r, 3) for r in ratios["prefix"]],
              "load_average_1min": load, "identical": identical}
    print(f"clean teacher-forced: {clean_rate:.1f} sequences/s; campaign over {sites} neuron sites x {len(bits)} bit(s): "
          f"prefix {rate['prefix']:.1f} faults/s ({statistics.median(ratios['prefix']):.2f}x clean; per round "
          f"{', '.join(f'{r:.2f}' for r in ratios['prefix'])}), full pass {rate['full']:.1f} faults/s "
          f"({statistics.median(ratios['full']):.2f}x clean); medians of {args.repeats} rounds, interleaved by "
          f"{args.interleave}; load average {load}; identical counts: {identical}")
    print(json.dumps(result))
    if not identical:
        raise SystemExit("prefix and full-pass results differ")
    return result


if __name__ == "__main__":
    np.set_printoptions(linewidth=200)
    main()
