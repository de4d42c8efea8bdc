"""Teacher-forced (next-token) fault injection in causal LMs, offline: tiny Llama (GQA) and GPT-2
(lm_head tied to wte) models built from configs, saved with save_pretrained and loaded with hf:.
Every figure is checked against an oracle computed here: a plain forward hook (or a hand edit of a
weight) XORing the element's bits through an int32 (fp32) or int16 (bf16) view, and metrics
recomputed from the oracle's logits in float64 numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainables.inject import engine, fault_models, tokens
from trainables.zoo.models import load_model

VOCAB, T, N = 64, 8, 8


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                 bos_token_id=0, eos_token_id=1)).save_pretrained(root / "llama")
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                               bos_token_id=0, eos_token_id=1)).save_pretrained(root / "gpt2")
    return {"llama": root / "llama", "gpt2": root / "gpt2"}


def token_data(n: int = N, t: int = T, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of t+1 random token ids cut as inputs w[:-1] and next-token labels w[1:]."""
    windows = torch.randint(0, VOCAB, (n, t + 1), generator=torch.Generator().manual_seed(seed))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def bench_for(lm_dirs, name: str, mode: str = "fp32", batch_size: int = 4, **kwargs) -> engine.Workbench:
    return engine.prepare(load_model(f"hf:{lm_dirs[name]}"), token_data(), mode=mode, batch_size=batch_size,
                          device="cpu", **kwargs)


def xor_mask(bit: int, width: int) -> int:
    """1 << bit as a signed integer of ``width`` bits."""
    return (1 << bit) - (1 << width) if bit == width - 1 else 1 << bit


INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def oracle_neuron_logits(model, inputs, module_name: str, positions, bits, batch_size: int) -> torch.Tensor:
    """Faulty logits from a plain forward hook that XORs element positions[i] of sequence i's output."""
    module = model.get_submodule(module_name)
    out_logits, offset = [], 0

    def hook(_m, _inp, out):
        tensor = out[0] if isinstance(out, tuple) else out
        flat = tensor.clone().reshape(tensor.shape[0], -1)
        width = torch.finfo(flat.dtype).bits
        ints = flat.view(INT_VIEW[flat.dtype])
        for i in range(flat.shape[0]):
            p, b = int(positions[offset + i]), int(bits[offset + i])
            ints[i, p] = ints[i, p] ^ xor_mask(b, width)
        flat = flat.reshape(tensor.shape)
        return (flat, *out[1:]) if isinstance(out, tuple) else flat

    handle = module.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for lo in range(0, inputs.shape[0], batch_size):
                offset = lo
                out_logits.append(model(inputs[lo : lo + batch_size]).float())
    finally:
        handle.remove()
    return torch.cat(out_logits)


def oracle_tensor_logits(model, inputs, tensor: torch.Tensor, positions, bits, per_fault: int) -> torch.Tensor:
    """Faulty logits with element positions[g] of ``tensor`` XORed by hand for group g, restored after."""
    out = []
    flat = tensor.detach().view(-1).view(INT_VIEW[tensor.dtype])
    width = torch.finfo(tensor.dtype).bits
    for g, lo in enumerate(range(0, inputs.shape[0], per_fault)):
        p = int(positions[lo])
        saved = flat[p].clone()
        flat[p] = flat[p] ^ xor_mask(int(bits[lo]), width)
        try:
            with torch.inference_mode():
                out.append(model(inputs[lo : lo + per_fault]).float())
        finally:
            flat[p] = saved
    return torch.cat(out)


def oracle_metrics(faulty: torch.Tensor, golden: torch.Tensor, labels: torch.Tensor, token: np.ndarray | None) -> dict:
    """Per-sequence next-token metrics recomputed in float64 numpy from the logits."""
    f, g, y = faulty.double().numpy(), golden.double().numpy(), labels.numpy()

    def log_softmax(x):
        m = x.max(axis=-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))

    with np.errstate(all="ignore"):
        lf, lg = log_softmax(f), log_softmax(g)
        changed = f.argmax(-1) != g.argmax(-1)
        nll = lambda ls: -np.take_along_axis(ls, y[..., None], -1)[..., 0].mean(1)  # noqa: E731
        kl_pos = (np.exp(lg) * (lg - lf)).sum(-1)
        rows = np.arange(f.shape[0])
        kl = kl_pos[rows, token] if token is not None else kl_pos.mean(1)
    return dict(token_changes=changed.sum(1), nonfinite=~np.isfinite(f).reshape(len(f), -1).all(1),
                first_change=np.where(changed.any(1), changed.argmax(1), -1), log_ppl_ratio=nll(lf) - nll(lg), kl=kl)


def golden_logits(bench: engine.Workbench, batch_size: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([bench.model(bench.images[lo : lo + batch_size]).float()
                          for lo in range(0, bench.num_images, batch_size)])


def check_against_oracle(bench, outcome, faulty, batch_size: int, neuron: bool) -> None:
    rec = outcome.records
    golden = golden_logits(bench, batch_size)
    token = rec.token if neuron else None
    want = oracle_metrics(faulty, golden, bench.labels.cpu(), token)
    assert len(rec) == N
    np.testing.assert_array_equal(rec.token_changes, want["token_changes"])
    np.testing.assert_array_equal(rec.first_change, want["first_change"])
    np.testing.assert_array_equal(rec.nonfinite, want["nonfinite"])
    finite = ~want["nonfinite"]
    np.testing.assert_allclose(rec.log_ppl_ratio[finite], want["log_ppl_ratio"][finite], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(rec.kl[finite], want["kl"][finite], rtol=1e-5, atol=1e-7)
    same = (faulty == golden).flatten(1).all(1).numpy()  # masked faults: nothing moved, exactly zero
    assert (rec.log_ppl_ratio[same] == 0).all() and (rec.kl[same] == 0).all()
    counts = outcome.counts
    assert counts.sequences == N and counts.total("tokens") == N * T
    assert counts.total("token_changes") == want["token_changes"].sum()
    assert counts.total("token_changes_sq") == (want["token_changes"] ** 2).sum()
    assert counts.total("changed") == (want["token_changes"] > 0).sum()
    assert counts.total("sdc") == ((want["token_changes"] > 0) & finite).sum()
    assert counts.total("nonfinite") == want["nonfinite"].sum()
    assert counts.total("finite") == finite.sum()
    np.testing.assert_allclose(counts.sum("kl"), want["kl"][finite].sum(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(counts.sum("log_ppl_ratio"), want["log_ppl_ratio"][finite].sum(), rtol=1e-5, atol=1e-4)
    # per bit: each fault counted under its bit
    for b in np.unique(rec.bit):
        assert counts.by_bit[tokens.COUNT_FIELDS.index("sequences"), b] == (rec.bit == b).sum()
    if neuron:  # causality: no finite sequence changes before its fault's token
        early = (rec.first_change >= 0) & (rec.first_change < rec.token) & ~rec.nonfinite
        assert not early.any()


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_neuron_faults_equal_a_hook_oracle(lm_dirs, mode):
    bench = bench_for(lm_dirs, "llama", mode)
    width = bench.width
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.act_fn", "model.embed_tokens"):
        site = next(s for s in bench.sites if s.name == name)
        for bit in ("random", width - 2):
            outcome = engine.run_faults(bench, site, "neuron", bit=bit, seed=3, record="all")
            rec = outcome.records
            drawn = fault_models.sample(3, "neuron", site.index, bit, width, site.output_numel, 0, N)
            np.testing.assert_array_equal(rec.position, drawn.positions)
            np.testing.assert_array_equal(rec.bit, drawn.bits)
            np.testing.assert_array_equal(rec.token, drawn.positions // site.output_shape[-1])
            faulty = oracle_neuron_logits(bench.model, bench.images, name, rec.position, rec.bit, 4)
            check_against_oracle(bench, outcome, faulty, 4, neuron=True)


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_weight_and_param_faults_equal_a_hand_edit(lm_dirs, mode):
    bench = bench_for(lm_dirs, "llama", mode, batch_size=2)
    before = {k: v.clone() for k, v in bench.model.state_dict().items()}
    weight_site = next(s for s in bench.sites if s.name == "model.layers.1.self_attn.k_proj")
    param = next(p for p in bench.params if p.name == "model.norm.weight")
    for kind, site, tensor in (("weight", weight_site, bench.model.get_submodule(weight_site.name).weight),
                               ("param", param, bench.model.get_parameter(param.name))):
        for bit in ("random", bench.width - 2):
            outcome = engine.run_faults(bench, site, kind, bit=bit, seed=5, record="all", images_per_weight_fault=2)
            rec = outcome.records
            np.testing.assert_array_equal(rec.token, -1)
            np.testing.assert_array_equal(rec.fault_group, np.arange(N) // 2)
            faulty = oracle_tensor_logits(bench.model, bench.images, tensor, rec.position, rec.bit, 2)
            check_against_oracle(bench, outcome, faulty, 2, neuron=False)
    after = bench.model.state_dict()
    assert all(torch.equal(before[k].view(-1).view(INT_VIEW.get(before[k].dtype, before[k].dtype)),
                           after[k].view(-1).view(INT_VIEW.get(after[k].dtype, after[k].dtype))) for k in before)


def test_causality_on_every_recorded_fault(lm_dirs):
    """Every neuron site of both models, random bits: no finite sequence changes before its token."""
    for name in ("llama", "gpt2"):
        bench = bench_for(lm_dirs, name)
        seen_after = 0
        for site in bench.sites:
            if site.container:
                continue
            rec = engine.run_faults(bench, site, "neuron", bit="random", seed=11, record="all").records
            assert (rec.token == rec.position // site.output_shape[-1]).all()
            finite = ~rec.nonfinite
            assert ((rec.first_change[finite] == -1) | (rec.first_change[finite] >= rec.token[finite])).all()
            seen_after += int(((rec.first_change >= rec.token) & finite).sum())
        assert seen_after > 0  # faults do change the fault's position or later ones


def test_counts_add_up_across_windows(lm_dirs):
    bench = bench_for(lm_dirs, "gpt2")
    site = next(s for s in bench.sites if s.name == "transformer.h.1.mlp.c_fc")
    whole = engine.run_faults(bench, site, "neuron", bit="random", seed=2)
    parts = engine.run_faults(bench, site, "neuron", bit="random", seed=2, start=0, stop=4).counts + \
        engine.run_faults(bench, site, "neuron", bit="random", seed=2, start=4, stop=N).counts
    np.testing.assert_array_equal(whole.counts.by_bit, parts.by_bit)
    np.testing.assert_allclose(whole.counts.sums, parts.sums, rtol=1e-12)


def test_golden_logits_over_budget_are_computed_per_window(lm_dirs):
    kept = bench_for(lm_dirs, "llama")
    bounded = bench_for(lm_dirs, "llama", golden_cache_mb=0)
    assert kept.golden_logits is not None and bounded.golden_logits is None
    site = next(s for s in kept.sites if s.name == "model.layers.0.mlp.down_proj")
    a = engine.run_faults(kept, site, "neuron", bit="random", seed=4, record="all").records
    b = engine.run_faults(bounded, site, "neuron", bit="random", seed=4, record="all").records
    for field, value in a.as_dict().items():
        np.testing.assert_array_equal(value, getattr(b, field), err_msg=field)


def test_param_sites_cover_every_parameter_once_with_tied_embeddings(lm_dirs):
    for name in ("llama", "gpt2"):
        bench = bench_for(lm_dirs, name)
        hf = bench.model.hf_model
        unique = {p.data_ptr(): p.numel() for _, p in hf.named_parameters(remove_duplicate=False)}
        assert sum(p.numel for p in bench.params if not p.buffer) == sum(unique.values())
        names = [p.name for p in bench.params]
        assert len(names) == len(set(names))
    gpt2 = bench_for(lm_dirs, "gpt2").model
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert "lm_head.weight" not in [p.name for p in bench_for(lm_dirs, "gpt2").params]


def test_lm_sites_and_the_integer_input(lm_dirs):
    bench = bench_for(lm_dirs, "llama")
    assert all(s.index > 0 for s in bench.sites)  # token ids are no input site 0
    leaves = [s.name for s in bench.sites if not s.container]
    assert leaves[0] == "model.embed_tokens" and leaves[-2:] == ["model.norm", "lm_head"]
    for layer in range(2):
        for part in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "post_attention_layernorm", "mlp.gate_proj", "mlp.act_fn", "mlp.up_proj", "mlp.down_proj"):
            assert f"model.layers.{layer}.{part}" in leaves
    assert all(s.output_shape[0] == T for s in bench.sites)
    assert bench.task == "next-token" and bench.golden.shape == (N, T)


def test_bad_lm_input_is_one_line(lm_dirs):
    model = load_model(f"hf:{lm_dirs['llama']}")
    ids = torch.randint(0, VOCAB, (2, 17))
    with pytest.raises(ValueError, match="sequence length 17 is over the model's context of 16 tokens"):
        engine.prepare(model, (ids, ids), device="cpu")
    with pytest.raises(ValueError, match="labels are the next tokens"):
        engine.prepare(model, (ids[:, :8], ids[:, 0]), device="cpu")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_layer_boundary_prefix_equals_the_full_pass(lm_dirs, name):
    """Every neuron site, weight site and param site, in forward order (the ladder) and then backwards:
    the prefix path's records equal the full pass's field by field; layer sites take the prefix path."""
    full = bench_for(lm_dirs, name, batch_size=3)
    fast = bench_for(lm_dirs, name, batch_size=3, prefix=True, prefix_cache_mb=64)
    from trainables.inject.layers import decoder_layers

    prefix = decoder_layers(fast.model)[0]
    layer_of = lambda n: int(n[len(prefix) + 1 :].split(".")[0]) if n.startswith(prefix + ".") else None  # noqa: E731
    weights = [s for s in fast.sites if s.is_weight_site]
    params = [p for p in fast.params if not p.buffer]
    leaves = [s for s in fast.sites if not s.container]
    containers = [s for s in fast.sites if s.container]
    neurons = leaves[:2] + leaves[2:-2:3] + leaves[-2:] + containers[-2:]  # every part of a layer is in some layer
    targets = [("neuron", s) for s in neurons] + [("weight", weights[i]) for i in (0, 4, -1)] + \
        [("param", params[i]) for i in (0, -1, -4)]
    paths = {}
    for kind, site in targets + targets[-3::-4]:
        kwargs = dict(bit="random", seed=7, record="all", images_per_weight_fault=2)
        want = engine.run_faults(full, full.site(kind, site.index), kind, **kwargs)
        got = engine.run_faults(fast, site, kind, **kwargs)
        assert want.path == "full"
        for field, value in want.records.as_dict().items():
            np.testing.assert_array_equal(getattr(got.records, field), value, err_msg=f"{kind} {site.name} {field}")
        np.testing.assert_array_equal(got.counts.by_bit, want.counts.by_bit)
        np.testing.assert_array_equal(got.counts.sums, want.counts.sums)
        paths[(kind, site.name)] = got.path
    name_of = {"llama": ("model.embed_tokens", "model.norm", "lm_head.weight"),
               "gpt2": ("transformer.wte", "transformer.ln_f", "transformer.wte.weight")}[name]
    assert paths[("neuron", name_of[0])] == "full" and paths[("neuron", name_of[1])] == "prefix"
    tied_or_head = paths[("param", name_of[2])]
    assert tied_or_head == ("prefix" if name == "llama" else "full")  # GPT-2's lm_head is the embedding
    assert all(path == ("prefix" if layer_of(site) else "full")  # layer 0: nothing before it to reuse
               for (kind, site), path in paths.items() if layer_of(site) is not None)
    assert sum(layer_of(site) == 1 and path == "prefix" for (kind, site), path in paths.items()) >= 4


def test_ray_campaign_rows_equal_the_engine_in_process(lm_dirs, ray_address, tmp_path):
    """python -m campaign run's path on Ray (run_campaign): teacher-forced rows, per-bit rows and
    per-fault records of 2 sites x 2 bits equal engine.run_faults in this process."""
    import analysis
    from campaign.runner import run_campaign
    from campaign.spec import CampaignSpec

    inputs, labels = token_data()
    torch.save({"input_ids": inputs, "labels": labels}, tmp_path / "tokens.pt")
    spec = CampaignSpec(model=f"hf:{lm_dirs['llama']}", dataset=f"tensors:{tmp_path / 'tokens.pt'}", sites=("neuron",),
                        layers="3,13", bits="30,22", seeds=(5,), record="all", out=str(tmp_path / "runs"), name="lm")
    outcome = run_campaign(spec)
    assert outcome.complete and outcome.finished == 4
    trials = analysis.load(outcome.directory)
    faults = analysis.load_faults(outcome.directory)
    bits = analysis.load_bits(outcome.directory)
    assert set(trials["trial_kind"]) == {"teacher-forced"} and set(faults["trial_kind"]) == {"teacher-forced"}
    bench = engine.prepare(load_model(f"hf:{lm_dirs['llama']}"), (inputs, labels), batch_size=256, device="cpu")
    for row in trials.itertuples(index=False):
        want = engine.run_faults(bench, bench.site("neuron", row.site_index), "neuron", bit=int(row.bit), seed=5,
                                 record="all")
        c = want.counts
        for name in tokens.COUNT_FIELDS:
            assert getattr(row, name) == c.total(name), name
        assert row.images == N and row.seq_len == T and row.golden_correct == 0
        assert row.kl_sum == c.sum("kl") and row.log_ppl_ratio_sum == c.sum("log_ppl_ratio")
        assert (row.ci_low, row.ci_high) == c.wilson()
        mine = faults[faults["trial_key"] == row.trial_key].sort_values("image")
        rec = want.records
        np.testing.assert_array_equal(mine["image"], rec.sequence)
        np.testing.assert_array_equal(mine["token"], rec.token)
        np.testing.assert_array_equal(mine["position"], rec.position)
        np.testing.assert_array_equal(mine["token_changes"], rec.token_changes)
        np.testing.assert_array_equal(mine["kl"], rec.kl)
        per_bit = bits[bits["trial_key"] == row.trial_key]
        assert per_bit["sequences"].sum() == N and per_bit["kl_sum"].sum() == pytest.approx(c.sum("kl"), rel=1e-12)
    table = analysis.tokens.per_site(trials)
    assert len(table) == 2 and table["sequences"].tolist() == [2 * N, 2 * N]
    assert table["sdc"].tolist() == [int(trials[trials.site_index == s]["sdc"].sum()) for s in table["site_index"]]
    for r in table.itertuples(index=False):  # the means and t-intervals from the recorded per-sequence values
        rows = faults[(faults["site_index"] == r.site_index) & ~faults["nonfinite"].astype(bool)]
        for column, mean, low in (("log_ppl_ratio", r.mean_log_ppl_ratio, r.log_ppl_ci_low), ("kl", r.mean_kl, r.kl_ci_low)):
            values = rows[column].to_numpy(dtype=float)
            half = analysis.tokens.t_quantile(len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
            assert mean == pytest.approx(values.mean(), rel=1e-9, abs=1e-15)
            assert mean - low == pytest.approx(half, rel=1e-6, abs=1e-15)
        changed = rows["token_changes"].to_numpy(dtype=float) / T
        assert r.token_change_rate == pytest.approx(changed.mean(), rel=1e-12)
    assert analysis.tokens.t_quantile(15) == 2.131 and analysis.tokens.t_quantile(1000) == 1.96
