"""Generation trials (trainables.inject.generation) against a hand-written greedy loop with hand-made flips."""
import numpy as np
import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from trainables.inject import generation as G

INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
NEW = 5


def llama(use_cache=True):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=24, use_cache=use_cache)
    return LlamaForCausalLM(cfg).eval()


def gpt2():
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=24, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def prompts():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 61, (2, 5), generator=g).tolist() + torch.randint(0, 61, (1, 4), generator=g).tolist()


def xor_(t, pos, bit):
    flat = t.reshape(t.shape[0], -1).view(INT[t.dtype])
    flat[0, pos] ^= torch.tensor(1 << bit, dtype=torch.int64).to(INT[t.dtype])  # int16 wraps: bit 15 -> -32768


def oracle(model, prompt, new, neuron=None, weight=None, kv=None):
    """Greedy decoding of one prompt with a plain forward hook / a hand edit of a weight or the cache."""
    ids = torch.tensor([prompt])
    cache, tokens, logits_all = DynamicCache(), [], []
    handle, saved = None, None
    if weight is not None:
        tensor, pos, bit = weight
        saved = tensor.detach().clone()
        with torch.no_grad():
            tensor.detach().view(-1).view(INT[tensor.dtype])[pos] ^= torch.tensor(1 << bit).to(INT[tensor.dtype])
    try:
        for step in range(new):
            if neuron is not None and step == neuron[2]:
                name, call, _, pos, bit = neuron
                calls = [0]

                def hook(_m, _i, out):
                    calls[0] += 1
                    if calls[0] - 1 == call:
                        out = out.clone()
                        xor_(out, pos, bit)
                        return out
                handle = model.get_submodule(name).register_forward_hook(hook)
            with torch.inference_mode():
                logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            if handle is not None:
                handle.remove()
                handle = None
            logits_all.append(logits[0].float())
            tokens.append(int(logits.argmax(-1)))
            if kv is not None and step == kv[0]:
                layer, tensor_name, pos, bit = kv[1:]
                with torch.inference_mode():
                    xor_(getattr(cache.layers[layer], tensor_name), pos, bit)
            ids = torch.tensor([[tokens[-1]]])
    finally:
        if saved is not None:
            with torch.no_grad():
                weight[0].detach().copy_(saved)
    return np.array(tokens), torch.stack(logits_all)


def same(a, b):
    """Bitwise equal float tensors (NaN equals NaN)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def bench_for(model, dtype="fp32", batch_size=1):
    return G.prepare_generation(model, prompts(), NEW, mode=dtype, batch_size=batch_size, device="cpu")


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["neuron", "weight", "param", "kv"])
def test_engine_equals_hand_written_oracle(kind, mode):
    model = llama()
    bench = bench_for(model, mode)
    high = 30 if mode == "fp32" else 14  # exponent MSB: changes the continuation often
    site = {"neuron": lambda: next(s for s in bench.sites if s.name == "model.layers.0.mlp.down_proj"),
            "weight": lambda: next(s for s in bench.sites if s.name == "model.layers.1.self_attn.v_proj"),
            "param": lambda: next(p for p in bench.params if p.name == "model.layers.0.input_layernorm.weight"),
            "kv": lambda: bench.kv[1]}[kind]()
    steps = None if kind in ("weight", "param") else "random"
    changed = 0
    for bit in (high,):
        out = G.run_generation(bench, site, kind, bit, seed=7, steps=steps, record="all", keep_logits=True)
        rec = out.records
        assert len(rec) == len(prompts()) and out.counts.faults == len(rec)
        for i in range(len(rec)):
            p, s, pos = int(rec.prompt[i]), int(rec.step[i]), int(rec.position[i])
            if kind == "neuron":
                tokens, logits = oracle(model, prompts()[p], NEW, neuron=(site.name, site.call, s, pos, bit))
                first = s
            elif kind == "kv":
                tokens, logits = oracle(model, prompts()[p], NEW, kv=(s, site.layer, site.tensor, pos, bit))
                first = s + 1
            else:
                tensor = model.get_submodule(site.name).weight if kind == "weight" else model.get_parameter(site.name)
                tokens, logits = oracle(model, prompts()[p], NEW, weight=(tensor, pos, bit))
                first = 0
            assert np.array_equal(rec.faulty[i], tokens)
            assert same(out.logits[i], logits[first:])
            unchanged = np.array_equal(tokens, bench.golden[p])
            assert bool(rec.identical[i]) == unchanged
            changed += not unchanged
    assert changed > 0  # the exponent flips changed some continuations: the comparison means something


@pytest.mark.parametrize("make", [llama, gpt2])
@pytest.mark.parametrize("kind", ["neuron", "kv"])
def test_golden_state_start_equals_regenerating_from_the_prompt(make, kind):
    bench = bench_for(make(), batch_size=2)  # chunks of 2 and 1 prompts, random steps: rows without a fault ride along
    site = bench.kv[2] if kind == "kv" else bench.sites[4]
    for bit in (30,):
        fast = G.run_generation(bench, site, kind, bit, seed=3, steps="random", record="all", keep_logits=True)
        full = G.run_generation(bench, site, kind, bit, seed=3, steps="random", record="all", prefix=False, keep_logits=True)
        assert (fast.path, full.path) == ("golden-state", "full")
        assert np.array_equal(fast.records.faulty, full.records.faulty)
        assert (fast.counts.faults, fast.counts.identical, fast.counts.sdc) == (full.counts.faults, full.counts.identical,
                                                                                full.counts.sdc)
        for i, s in enumerate(fast.records.step):
            start = s if kind == "neuron" else s + 1
            assert same(fast.logits[i], full.logits[i][start:])


def test_weight_fault_persists_and_is_restored_bit_for_bit():
    model = llama()
    bench = bench_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    site = next(s for s in bench.sites if s.name == "lm_head")
    out = G.run_generation(bench, site, "weight", 30, seed=2, record="all", keep_logits=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.int32), before[k].view(torch.int32)), k
    # persistence: the oracle with the flip in place at every step equals the engine; with the flip
    # only during the prefill (restored before step 1) it would differ for some prompt
    differ = 0
    for i, p in enumerate(out.records.prompt):
        pos = int(out.records.position[i])
        tokens, logits = oracle(model, prompts()[p], NEW, weight=(model.lm_head.weight, pos, 30))
        assert same(out.logits[i], logits)
        differ += not same(logits[1:], oracle(model, prompts()[p], NEW)[1][1:])
    assert differ > 0


def test_kv_fault_never_leaks_into_the_golden_state_or_the_next_trial():
    bench = bench_for(llama(), batch_size=2)
    golden_cache = [(k.clone(), v.clone()) for c in bench.chunks for k, v in zip(c.keys, c.values)]
    golden_tokens = bench.golden.copy()
    quiet = G.run_generation(bench, bench.sites[3], "neuron", 0, seed=9, steps=[2], record="all")
    loud = G.run_generation(bench, bench.kv[0], "kv", 30, seed=4, steps=[0, 2], record="all")
    assert loud.counts.sdc + loud.counts.nonfinite > 0
    again = G.run_generation(bench, bench.sites[3], "neuron", 0, seed=9, steps=[2], record="all")
    assert np.array_equal(again.records.faulty, quiet.records.faulty) and again.counts.faults == quiet.counts.faults
    assert np.array_equal(bench.golden, golden_tokens)
    now = [(k, v) for c in bench.chunks for k, v in zip(c.keys, c.values)]
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) and torch.equal(c.view(torch.int32), d.view(torch.int32))
               for (a, c), (b, d) in zip(golden_cache, now))


def test_counts_reduce_and_metrics_follow_the_records():
    bench = bench_for(llama())
    a = G.run_generation(bench, bench.kv[3], "kv", 30, seed=1, steps="random", start=0, stop=2, record="all")
    b = G.run_generation(bench, bench.kv[3], "kv", 30, seed=1, steps="random", start=2, stop=3, record="all")
    whole = G.run_generation(bench, bench.kv[3], "kv", 30, seed=1, steps="random", record="all")
    total = a.counts + b.counts
    assert (total.faults, total.identical, total.sdc, total.nonfinite) == (whole.counts.faults, whole.counts.identical,
                                                                            whole.counts.sdc, whole.counts.nonfinite)
    assert np.array_equal(total.by_step, whole.counts.by_step) and np.array_equal(total.by_bit, whole.counts.by_bit)
    r = whole.records
    golden = bench.golden[r.prompt]
    for i in range(len(r)):
        diff = np.nonzero(r.faulty[i] != golden[i])[0]
        assert r.first_divergence[i] == (diff[0] if len(diff) else -1)
    assert G.edit_distances(np.array([[1, 2, 3, 4]]), np.array([[2, 3, 4, 5]]))[0] == 2  # delete 1, insert 5
    assert np.isclose(whole.counts.edit_sum, r.edit_distance.sum())
    assert whole.counts.by_step[0].sum() == 3 and whole.counts.by_step[0, NEW - 1] == 0  # kv steps are 0..NEW-2


def test_bad_input_one_line_each():
    bench = bench_for(llama())
    with pytest.raises(ValueError, match="decode step 5 is beyond new_tokens 5"):
        G.run_generation(bench, bench.sites[3], "neuron", 0, seed=1, steps=[1, 5])
    with pytest.raises(ValueError, match="decode step 4 is beyond new_tokens 5: kv faults"):
        G.run_generation(bench, bench.kv[0], "kv", 0, seed=1, steps=[4])
    with pytest.raises(ValueError, match="over the model's context length 24"):
        G.prepare_generation(llama(), [[1] * 20], 5, device="cpu")
    no_cache = G.prepare_generation(llama(use_cache=False), prompts(), NEW, device="cpu")
    assert no_cache.kv == []
    with pytest.raises(ValueError, match="has no KV cache .its config has use_cache False"):
        G.kv_sites(llama(use_cache=False))
    with pytest.raises(ValueError, match="need a KVSite"):
        G.run_generation(no_cache, no_cache.sites[2], "kv", 0, seed=1, steps=[1])
    for e in (ValueError,):
        with pytest.raises(e, match="take no decode steps"):
            G.run_generation(bench, bench.params[0], "param", 0, seed=1, steps=[1])


def test_model_without_cache_decodes_the_whole_sequence_each_step():
    model = llama()
    cached = bench_for(model)
    uncached = G.prepare_generation(llama(use_cache=False), prompts(), NEW, device="cpu")
    assert np.array_equal(cached.golden, uncached.golden) or uncached.no_cache is not None
    site = uncached.sites[4]
    fast = G.run_generation(uncached, site, "neuron", 30, seed=2, steps="random", record="all")
    full = G.run_generation(uncached, site, "neuron", 30, seed=2, steps="random", record="all", prefix=False)
    assert np.array_equal(fast.records.faulty, full.records.faulty)
