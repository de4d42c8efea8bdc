"""Generation trials: faults started from the cached golden state vs regenerated from the prompt,
side by side in one run on the same faults (uniformly drawn decode steps), tokens checked identical.
The two paths alternate fault by fault (each prompt's fault run by one path then the other, the
order flipping each time) over ``--repeats`` rounds; each round's summed times give a ratio and
the median ratio is reported, so a shared machine's load moves both alike; the load average is printed.

    OMP_NUM_THREADS=1 python benchmarks/lm_generation.py           # a tiny Llama built from a config
    OMP_NUM_THREADS=1 python benchmarks/lm_generation.py --model demo:lm --new-tokens 32
    OMP_NUM_THREADS=1 python benchmarks/lm_generation.py --sites all   # every leaf neuron site in turn

The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainables.inject import generation  # noqa: E402


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="hf:<dir>; default a 4-layer width-128 Llama from a config")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--kinds", default="neuron,kv")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sites", default="layers.1.mlp.down_proj",
                    help="neuron sites: a name suffix, or 'all' (every leaf neuron site, one trial each)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        from trainables.zoo.models import load_model
        model = load_model(args.model)
    else:
        model = tiny_llama(2048)
    vocab = int(getattr(model, "vocab_size", None) or model.config.vocab_size)
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, vocab, (args.prompts, args.prompt_len), generator=g).tolist()
    bench = generation.prepare_generation(model, prompts, args.new_tokens, batch_size=args.batch_size, device="cpu")
    result = {"model": args.model or "llama 4x128 vocab 2048", "new_tokens": args.new_tokens, "prompts": args.prompts,
              "prompt_len": args.prompt_len, "batch_size": args.batch_size, "threads": args.threads,
              "repeats": args.repeats}
    load_before = os.getloadavg()
    for kind in args.kinds.split(","):
        if kind == "kv":
            sites = [bench.kv[len(bench.kv) // 2]]
        elif args.sites == "all":
            sites = [s for s in bench.sites if not s.container and s.index > 0]
        else:
            sites = [next(s for s in bench.sites if s.name.endswith(args.sites))]
        times = {True: [], False: []}
        outs = {True: [], False: []}
        flip = 0
        for round_ in range(args.repeats):
            spent = {True: 0.0, False: 0.0}
            for site in sites:
                for p in range(args.prompts):
                    flip += 1
                    for prefix in ((True, False) if flip % 2 else (False, True)):
                        start = time.perf_counter()
                        out = generation.run_generation(bench, site, kind, "random", args.seed, steps="random",
                                                        start=p, stop=p + 1, record="all", prefix=prefix)
                        spent[prefix] += time.perf_counter() - start
                        if round_ == 0:
                            outs[prefix].append(out)
            for prefix in (True, False):
                times[prefix].append(spent[prefix])
        identical = all(np.array_equal(a.records.faulty, b.records.faulty) and np.array_equal(a.records.nonfinite, b.records.nonfinite)
                        for a, b in zip(outs[True], outs[False]))
        n = sum(o.counts.faults for o in outs[True])
        ratios = [b / a for a, b in zip(times[True], times[False])]
        fast, slow = statistics.median(times[True]), statistics.median(times[False])
        mean_step = float(np.mean(np.concatenate([o.records.step for o in outs[True]])))
        what = sites[0].name if len(sites) == 1 else f"{len(sites)} sites"
        print(f"{kind:>6} ({what}): {n} faults at random steps (mean step {mean_step:.1f}): "
              f"golden-state start {n / fast:.2f} faults/s, regenerate from prompt {n / slow:.2f} faults/s, "
              f"ratio {statistics.median(ratios):.2f}x (median of {args.repeats} rounds, faults interleaved; per round "
              f"{', '.join(f'{r:.2f}' for r in ratios)}), tokens identical: {identical}")
        result[kind] = {"sites": what, "faults": n, "mean_step": round(mean_step, 2), "golden_state_per_s": round(n / fast, 2),
                        "regenerate_per_s": round(n / slow, 2), "ratio": round(statistics.median(ratios), 3),
                        "ratios": [round(r, 3) for r in ratios], "identical": identical}
    result["load_average_1min"] = f"{load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}"
    print(f"load average (1 min) {result['load_average_1min']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
