"""The LM fast paths against the full paths, field by field: teacher-forced faults after a decoder
layer's attention (its golden output stubbed in, trainables.inject.layers) and generation faults
that stop decoding once the state is golden again (trainables.inject.generation)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import test_generation as gen_tests
from tests import test_language_models as lm_tests
from trainables.inject import engine, layers, tokens
from trainables.inject import generation as G

lm_dirs = lm_tests.lm_dirs  # the fixture: tiny Llama and GPT-2 saved with save_pretrained
bench_for = lm_tests.bench_for


def assert_same(want, got, what):
    for field, value in want.records.as_dict().items():
        np.testing.assert_array_equal(getattr(got.records, field), value, err_msg=f"{what} {field}")
    np.testing.assert_array_equal(got.counts.by_bit, want.counts.by_bit, err_msg=what)
    np.testing.assert_array_equal(got.counts.sums, want.counts.sums, err_msg=what)


def post_attention_targets(bench):
    """Layer 1's sites after its attention (neuron) and the weights read there, in forward order."""
    prefix = layers.decoder_layers(bench.model)[0]
    inside = [s for s in bench.sites if s.name.startswith(f"{prefix}.1.") and not s.container]
    neurons = [s for s in inside if layers.after_attention(bench.model, bench.sites, s, "neuron", None, 1)]
    weights = [s for s in inside if s.is_weight_site
               and layers.after_attention(bench.model, bench.sites, s, "weight", engine._fault_tensor(bench, s, "weight"), 1)]
    return [("neuron", s) for s in neurons] + [("weight", s) for s in weights]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_attention_stub_equals_the_full_pass(lm_dirs, name):
    """Layer 1's post-attention neuron and weight sites: the stubbed attention is used (verified) and
    every record, count and sum equals the full pass's; the attention sites before them do not stub it."""
    full = bench_for(lm_dirs, name, batch_size=3)
    fast = bench_for(lm_dirs, name, batch_size=3, prefix=True, prefix_cache_mb=64)
    targets = post_attention_targets(fast)
    expected = {"llama": {"model.layers.1.post_attention_layernorm", "model.layers.1.mlp.gate_proj",
                          "model.layers.1.mlp.act_fn", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"},
                "gpt2": {"transformer.h.1.ln_2", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.act",
                         "transformer.h.1.mlp.c_proj", "transformer.h.1.mlp.dropout"}}[name]
    assert {s.name for kind, s in targets if kind == "neuron"} == expected
    assert any(kind == "weight" for kind, _ in targets)
    attention_site = next(s for s in fast.sites if ".1.self_attn.q_proj" in s.name or ".1.attn.c_attn" in s.name)
    weights = [t for t in targets if t[0] == "weight"]
    for kind, site in [("neuron", attention_site)] + [t for t in targets if t[0] == "neuron"] + weights[-1:]:
        for bit in ("random",):
            kwargs = dict(bit=bit, seed=5, record="all", images_per_weight_fault=2)
            want = engine.run_faults(full, full.site(kind, site.index), kind, **kwargs)
            got = engine.run_faults(fast, site, kind, **kwargs)
            assert (want.path, got.path) == ("full", "prefix")
            assert fast.prefix_state.runner.after_attention == (site is not attention_site), site.name
            assert_same(want, got, f"{kind} {site.name} bit {bit}")
    assert fast.prefix_state.runner.attention_checked == ""


def test_an_attention_stub_that_differs_is_not_used(lm_dirs, monkeypatch):
    """A stubbed attention output that is not the golden one fails the check: the plain layer cut runs
    (the attention recomputed) and the records still equal the full pass's."""
    real = layers.LayerRunner.live_attention

    def perturbed(self, lo, hi, hidden):
        out = real(self, lo, hi, hidden)
        return (out[0] + 1.0, *out[1:])

    monkeypatch.setattr(layers.LayerRunner, "live_attention", perturbed)
    full = bench_for(lm_dirs, "llama", batch_size=3)
    fast = bench_for(lm_dirs, "llama", batch_size=3, prefix=True, prefix_cache_mb=64)
    site = next(s for s in fast.sites if s.name == "model.layers.1.mlp.down_proj")
    want = engine.run_faults(full, full.site("neuron", site.index), "neuron", bit="random", seed=5, record="all")
    got = engine.run_faults(fast, site, "neuron", bit="random", seed=5, record="all")
    runner = fast.prefix_state.runner
    assert got.path == "prefix" and runner.after_attention is False
    assert runner.attention_checked.startswith("stubbing the attention of decoder layer 1 does not reproduce")
    assert_same(want, got, "fallback")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_layer_cuts_take_their_inputs_and_attention_from_the_golden_pass(lm_dirs, name, monkeypatch):
    """prepare keeps each decoder layer's golden output and each later layer's attention output per
    batch; the cuts take them from there (only the checks' two-sequence probes are computed) and the
    records equal the full pass's. With no room for them, the cuts compute them and nothing changes."""
    full = bench_for(lm_dirs, name, batch_size=3)
    fast = bench_for(lm_dirs, name, batch_size=3, prefix=True, prefix_cache_mb=64)
    tight = bench_for(lm_dirs, name, batch_size=3, prefix=True, prefix_cache_mb=0.001)
    n, count = fast.num_images, len(layers.decoder_layers(fast.model)[1])
    batches = [(lo, min(lo + 3, n)) for lo in range(0, n, 3)]
    kept = fast.golden_layers
    assert set(kept.outputs) == {(j, lo, hi) for j in range(count) for lo, hi in batches}
    assert set(kept.attention) == {(j, lo, hi) for j in range(1, count) for lo, hi in batches}
    assert not tight.golden_layers.outputs and not tight.golden_layers.attention
    computed = {True: [], False: []}  # sequences of each layer input a runner computed, by bench (kept or not)
    real = layers.LayerRunner._capture

    def capture(self, lo, hi, below):
        computed[self.golden is fast.golden_layers].append(hi - lo)
        return real(self, lo, hi, below)

    monkeypatch.setattr(layers.LayerRunner, "_capture", capture)
    prefix = layers.decoder_layers(fast.model)[0]
    chosen = [s for s in fast.sites if not s.container and s.name.startswith((f"{prefix}.1.", f"{prefix}.2."))][::2]
    for site in chosen:
        want = engine.run_faults(full, full.site("neuron", site.index), "neuron", bit="random", seed=2, record="all")
        for bench in (fast, tight):
            got = engine.run_faults(bench, site, "neuron", bit="random", seed=2, record="all")
            assert got.path == "prefix"
            assert_same(want, got, f"{site.name} kept={bench is fast}")
    assert set(computed[True]) == {2} and 3 in computed[False]  # kept: only the checks' probes were computed


@pytest.mark.parametrize("make,batch_size", [(gen_tests.llama, 1), (gen_tests.gpt2, 2)])
def test_generation_stops_when_the_state_is_golden_again_with_the_regenerated_records(make, batch_size, monkeypatch):
    """Neuron faults in the last layer's MLP, the final norm and the head (their flips are often
    masked bit for bit, and write no cache) and in layer 0: decoding from the golden state stops
    early where the state is golden again, and every record equals decoding from the prompt."""
    bench = G.prepare_generation(make(), gen_tests.prompts(), 6, batch_size=batch_size, device="cpu")
    outcomes = []
    real = G._Chunk.settled

    def counted(self, *args):
        outcomes.append(real(self, *args))
        return outcomes[-1]

    monkeypatch.setattr(G._Chunk, "settled", counted)
    names = [s.name for s in bench.sites if not s.container]
    chosen = [n for n in names if n.endswith(("1.mlp.down_proj", "1.mlp.c_proj", "norm", "ln_f", "lm_head"))][-3:]
    chosen.append(next(n for n in names if ".0." in n))
    for name in chosen:
        site = next(s for s in bench.sites if s.name == name)
        for bit in ("random", 3):
            fast = G.run_generation(bench, site, "neuron", bit, seed=4, steps="random", record="all")
            full = G.run_generation(bench, site, "neuron", bit, seed=4, steps="random", record="all", prefix=False)
            for field, value in full.records.as_dict().items():
                np.testing.assert_array_equal(getattr(fast.records, field), value, err_msg=f"{name} {bit} {field}")
            assert (fast.counts.identical, fast.counts.sdc, fast.counts.nonfinite) == \
                (full.counts.identical, full.counts.sdc, full.counts.nonfinite)
            np.testing.assert_array_equal(fast.counts.by_step, full.counts.by_step)
    assert True in outcomes and False in outcomes  # both ways were taken: stopped early, and decoded on



def test_decoding_from_layer_l_while_the_tokens_are_golden_equals_regenerating(monkeypatch):
    """Neuron faults in layer 1 and kv faults in layer 1's cache: the steps after the fault run from
    layer 1 (layer 0 stubbed with its golden output) until a token differs, then every layer again;
    tokens and logits equal decoding from the prompt bit for bit, both ways taken. (GPT-2's kv
    faults take this path in test_generation's golden-state test.)"""
    bench = G.prepare_generation(gen_tests.llama(), gen_tests.prompts(), 8, batch_size=2, device="cpu")
    stubbed = []
    real = layers._stubbed

    def counted(decoder, k, hidden):
        stubbed.append(k)
        return real(decoder, k, hidden)

    monkeypatch.setattr(layers, "_stubbed", counted)
    names = [s.name for s in bench.sites if not s.container and (".1." in s.name)]
    targets = [("neuron", next(s for s in bench.sites if s.name == n)) for n in (names[len(names) // 2], names[-1])]
    targets += [("kv", bench.kv[3])]
    diverged = 0
    for kind, site in targets:
        for bit in (30,):
            fast = G.run_generation(bench, site, kind, bit, seed=6, steps="random", record="all", keep_logits=True)
            full = G.run_generation(bench, site, kind, bit, seed=6, steps="random", record="all", prefix=False,
                                    keep_logits=True)
            for field, value in full.records.as_dict().items():
                np.testing.assert_array_equal(getattr(fast.records, field), value, err_msg=f"{site.name} {bit} {field}")
            for i, s in enumerate(fast.records.step):
                start = s if kind == "neuron" else s + 1
                assert gen_tests.same(fast.logits[i], full.logits[i][start:]), f"{site.name} {bit} fault {i}"
            diverged += int((~fast.records.identical).sum())
    assert bench.cuts == {1: ""} and stubbed and set(stubbed) == {1}
    assert diverged > 0  # some continuations changed: the switch back to every layer ran


def test_a_layer_cut_that_does_not_reproduce_the_golden_steps_is_not_used():
    """Golden layer outputs that are not the golden run's (hand-perturbed on the first chunk) fail the
    check once: the cut is refused with the reason, and the faults decode every layer, as from the prompt."""
    bench = G.prepare_generation(gen_tests.llama(), gen_tests.prompts(), 6, device="cpu")
    with torch.inference_mode():
        for step_output in bench.chunks[0].hidden[0]:
            step_output.add_(1.0)
    site = next(s for s in bench.sites if s.name == "model.layers.1.mlp.down_proj")
    fast = G.run_generation(bench, site, "neuron", 30, seed=2, steps="random", record="all")
    full = G.run_generation(bench, site, "neuron", 30, seed=2, steps="random", record="all", prefix=False)
    assert bench.cuts[1].startswith("stubbing decoder layers 0..0 does not reproduce decode step 1")
    for field, value in full.records.as_dict().items():
        np.testing.assert_array_equal(getattr(fast.records, field), value, err_msg=field)


@pytest.mark.parametrize("name,mode", [("llama", "fp32"), ("gpt2", "bf16")])
def test_only_rows_whose_head_input_changed_are_measured_with_the_full_pass_records(lm_dirs, name, mode, monkeypatch):
    """Teacher-forced neuron faults with prefix reuse asked for measure only the rows whose head input
    differs from the golden one (batches as in the golden pass; on the layer cut or, before the first
    layer, the full pass); every record, count and sum equals the full pass's without prefix reuse. A window whose batches are not the golden pass's measures every row, with the same records."""
    full = bench_for(lm_dirs, name, mode=mode, batch_size=3)
    fast = bench_for(lm_dirs, name, mode=mode, batch_size=3, prefix=True, prefix_cache_mb=64)
    measured = []
    real = tokens.NextTokenMetric._add_changed_rows

    def counted(self, lo, hi, logits, head_input):
        measured.append(int((head_input != self.bench.golden_head_input[self.start + lo : self.start + hi]).any(-1).sum()))
        return real(self, lo, hi, logits, head_input)

    monkeypatch.setattr(tokens.NextTokenMetric, "_add_changed_rows", counted)
    leaves = [s for s in fast.sites if not s.container]
    head = engine.head_module(fast.model)[0]
    for site in leaves[1::4] + [s for s in leaves if s.name == head]:
        for bit in (14 if mode == "bf16" else 30,):
            for start, stop in ((0, None), (1, 8)):
                before = len(measured)
                kwargs = dict(bit=bit, seed=9, record="all", start=start, stop=stop)
                want = engine.run_faults(full, full.site("neuron", site.index), "neuron", **kwargs)
                got = engine.run_faults(fast, site, "neuron", **kwargs)
                assert_same(want, got, f"{site.name} bit {bit} from {start}")
                restricted = start == 0 and site.name != head  # the prefix path or not (the embedding)
                assert (len(measured) > before) == restricted, site.name
    rows = fast.images.shape[1] * 3
    assert measured and min(measured) < rows and max(measured) > 0  # some batches skipped rows, some measured them
    assert fast.rows_check == ""


def test_rows_are_all_measured_where_the_subset_check_failed(lm_dirs, monkeypatch):
    """A workbench whose check of the metric on a subset of rows failed measures every row: the
    changed-rows metric is never called, and the records equal the full pass's."""
    full = bench_for(lm_dirs, "llama", batch_size=3)
    fast = bench_for(lm_dirs, "llama", batch_size=3, prefix=True, prefix_cache_mb=64)
    monkeypatch.setattr(engine, "_check_rows", lambda bench: "failed here")
    monkeypatch.setattr(tokens.NextTokenMetric, "_add_changed_rows", lambda *args: pytest.fail("rows skipped"))
    site = next(s for s in fast.sites if s.name == "model.layers.1.mlp.up_proj")
    want = engine.run_faults(full, full.site("neuron", site.index), "neuron", bit=30, seed=3, record="all")
    got = engine.run_faults(fast, site, "neuron", bit=30, seed=3, record="all")
    assert got.path == "prefix" and fast.rows_check == "failed here"
    assert_same(want, got, "every row")
