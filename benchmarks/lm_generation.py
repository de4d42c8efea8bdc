"""Generation trials: faults started from the cached golden state vs regenerated from the prompt,
side by side in one run on the same faults (uniformly drawn decode steps), tokens checked identical.

    python benchmarks/lm_generation.py                      # a tiny Llama built from a config
    python benchmarks/lm_generation.py --model hf:<dir> --new-tokens 32

The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--kinds", default="neuron,kv")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.model:
        from trainables.zoo.models import load_model
        model = load_model(args.model)
    else:
        model = tiny_llama(2048)
    vocab = int(getattr(model, "vocab_size", None) or model.config.vocab_size)
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, vocab, (args.prompts, args.prompt_len), generator=g).tolist()
    bench = generation.prepare_generation(model, prompts, args.new_tokens, batch_size=args.batch_size, device="cpu")
    result = {"new_tokens": args.new_tokens, "prompts": args.prompts, "prompt_len": args.prompt_len}
    for kind in args.kinds.split(","):
        site = bench.kv[len(bench.kv) // 2] if kind == "kv" else next(s for s in bench.sites if s.name.endswith("layers.1.mlp.down_proj"))
        times, outs = {}, {}
        for prefix in (True, False):
            start = time.perf_counter()
            outs[prefix] = generation.run_generation(bench, site, kind, "random", args.seed, steps="random", record="all",
                                                     prefix=prefix)
            times[prefix] = time.perf_counter() - start
        identical = bool(np.array_equal(outs[True].records.faulty, outs[False].records.faulty))
        n = outs[True].counts.faults
        print(f"{kind:>6} ({site.name}): {n} faults at random steps (mean step {outs[True].records.step.mean():.1f}): "
              f"golden-state start {n / times[True]:.2f} faults/s, regenerate from prompt {n / times[False]:.2f} faults/s, "
              f"ratio {times[False] / times[True]:.2f}x, tokens identical: {identical}")
        result[kind] = {"faults": n, "golden_state_per_s": n / times[True], "regenerate_per_s": n / times[False],
                        "ratio": times[False] / times[True], "identical": identical}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
