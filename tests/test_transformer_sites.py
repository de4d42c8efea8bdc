"""Sites beyond CNN leaves: param sites, tuple outputs (nn.MultiheadAttention), container
modules, integer inputs, coverage; each checked against an independent bitstring oracle."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

from campaign.cli import build_parser, main, spec_from_args
from campaign.spec import CampaignSpec, SpecError, resolve
from tests.models_for_tests import make_data, plain_net
from trainables.inject import engine
from trainables.inject.reference import bitstring_flip
from trainables.inject.sites import (
    coverage_lines,
    enumerate_sites,
    match_modules,
    param_sites,
    parse_patterns,
    select_campaign_sites,
    select_params,
    survey,
)
from trainables.trial import CampaignSettings, TrialPoint, run_trial
from trainables.zoo.data import load_dataset
from trainables.zoo.models import load_model

MHA = "encoder.layers.encoder_layer_{}.self_attention"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is fastest, and immune to a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def vit_bench():
    """demo:vit (random weights until its trained weights ship) on 128 shipped test images."""
    data = load_dataset("fashion-mnist", limit=96)
    return engine.prepare(load_model("demo:vit", weights="none"), (data.images, data.labels), batch_size=48, device="cpu")


def state_bits(model):
    return {k: v.detach().clone().view(torch.uint8) if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- enumeration and numbering


def test_param_sites_number_every_floating_tensor_in_state_dict_order():
    params, non_floating = param_sites(plain_net())
    assert [(p.index, p.name, p.module_type, p.buffer) for p in params] == [
        (0, "0.weight", "Conv2d", False), (1, "0.bias", "Conv2d", False), (2, "1.weight", "BatchNorm2d", False),
        (3, "1.bias", "BatchNorm2d", False), (4, "1.running_mean", "BatchNorm2d", True),
        (5, "1.running_var", "BatchNorm2d", True), (6, "4.weight", "Conv2d", False), (7, "4.bias", "Conv2d", False),
        (8, "7.weight", "Linear", False), (9, "7.bias", "Linear", False), (10, "10.weight", "Linear", False),
        (11, "10.bias", "Linear", False)]
    assert non_floating == [("1.num_batches_tracked", "int64")]
    assert params[8].shape == (32, 256) and params[8].numel == 8192
    floating = [k for k, v in plain_net().state_dict().items() if v.is_floating_point()]
    assert [p.name for p in params] == floating


def test_a_tensor_shared_by_two_modules_is_one_param_site():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert [p.name for p in param_sites(model)[0]] == ["0.weight", "0.bias", "1.bias"]


def test_attention_is_a_leaf_site_on_its_first_output_and_out_proj_never_runs(vit_bench):
    sites = vit_bench.sites
    leaves = [s for s in sites if not s.container]
    attention = [s for s in leaves if s.module_type == "MultiheadAttention"]
    tokens, dim = vit_bench.model.encoder.pos_embedding.shape[1:]
    assert [(s.index, s.name, s.output_index, s.output_shape) for s in attention] == [
        (3 + 6 * i, MHA.format(i), 0, (tokens, dim)) for i in range(4)]
    assert [s.module_type for s in leaves[:8]] == ["Identity", "Conv2d", "LayerNorm", "MultiheadAttention", "LayerNorm",
                                                   "Linear", "GELU", "Linear"]
    containers = [s for s in sites if s.container]
    assert [s.index for s in containers] == list(range(len(leaves), len(sites)))  # after every leaf site
    assert [(s.name, s.module_type) for s in containers[:2]] == [("encoder.layers.encoder_layer_0.mlp", "MLPBlock"),
                                                                 ("encoder.layers.encoder_layer_0", "EncoderBlock")]
    assert len(leaves) == 28 and enumerate_sites(vit_bench.model, (1, 28, 28)) == leaves  # containers on request
    found = survey(vit_bench.model, (1, 28, 28))
    assert found.never_ran == [(f"{MHA.format(i)}.out_proj", "NonDynamicallyQuantizableLinear") for i in range(4)]
    assert found.skipped == ()


def test_cnn_numbering_is_unchanged_and_containers_come_after():
    model = load_model("demo:resnet", weights="none")
    leaves = enumerate_sites(model, (1, 28, 28))
    everything = enumerate_sites(model, (1, 28, 28), containers=True)
    assert len(leaves) == 28 and sum(s.is_weight_site for s in leaves) == 19
    assert everything[:28] == leaves and all(s.output_index is None for s in leaves)
    assert [(s.index, s.name, s.module_type) for s in everything[28:]] == [
        (28, "layer1", "BasicBlock"), (29, "layer2.downsample", "Sequential"), (30, "layer2", "BasicBlock"),
        (31, "layer3.downsample", "Sequential"), (32, "layer3", "BasicBlock")]  # in the order their outputs appear
    assert all(s.container and not s.is_weight_site for s in everything[28:])
    assert [s.index for s in everything] == list(range(len(everything)))


class _Outputs(nn.Module):
    """Leaf modules with every kind of output a forward hook can see."""

    class Pair(nn.Module):
        def forward(self, x):
            return None, x * 2, x  # the first floating tensor is element 1

    class AsList(nn.Module):
        def forward(self, x):
            return [x + 1]

    class AsDict(nn.Module):
        def forward(self, x):
            return {"x": x}

    class Argmax(nn.Module):
        def forward(self, x):
            return x.argmax(dim=1)

    class Shared(nn.Module):
        def forward(self, x):
            return x.mean(dim=0, keepdim=True)  # (1, ...): not per example

    def __init__(self):
        super().__init__()
        self.pair, self.as_list, self.as_dict, self.argmax, self.shared = (
            self.Pair(), self.AsList(), self.AsDict(), self.Argmax(), self.Shared())
        self.attention = nn.MultiheadAttention(4, 2)  # batch_first=False: (L, N, E) output
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # x: (N, 5, 4)
        x = self.pair(x)[1]
        x = self.as_list(x)[0]
        x = self.as_dict(x)["x"]
        self.argmax(x)
        x = x + self.shared(x)
        seq = x.transpose(0, 1)
        x = x + self.attention(seq, seq, seq)[0].transpose(0, 1)
        return self.fc(x.mean(dim=1))


def test_tuple_and_list_outputs_are_sites_and_other_outputs_are_reported():
    found = survey(_Outputs().eval(), (5, 4))
    assert [(s.index, s.name, s.output_index) for s in found.sites] == [
        (0, "input", None), (1, "pair", 1), (2, "as_list", 0), (3, "fc", None)]
    assert [(c.name, c.call, c.reason) for c in found.skipped] == [
        ("as_dict", 0, "its output is dict, not a tensor, tuple or list"),
        ("argmax", 0, "its output is a int64 tensor, not floating"),
        ("shared", 0, "its output has shape [1, 5, 4]: its first dimension is not the batch (2)"),
        ("attention", 0, "element 0 of its tuple output has shape [5, 2, 4]: its first dimension is not the batch (2)"),
    ]
    assert found.never_ran == [("attention.out_proj", "NonDynamicallyQuantizableLinear")]
    lines = coverage_lines(_Outputs(), found, {"weight": [found.sites[3]]})
    assert lines[0] == "weight sites cover 12 of 95 parameters (12.6%)"
    assert lines[3].startswith("calls that are no neuron sites (4): as_dict call 0 (AsDict): its output is dict")


def test_pair_output_fault_lands_in_element_1():
    model = _Outputs().eval()
    images = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(0))
    bench = engine.prepare(model, (images, torch.zeros(6, dtype=torch.long)), batch_size=4, device="cpu")
    pair = bench.site("neuron", 1)
    records = engine.run_faults(bench, pair, "neuron", 31, seed=3, record="all").records
    expected = (images * 2).reshape(6, -1)[torch.arange(6), torch.from_numpy(records.position)]
    assert torch.equal(torch.from_numpy(records.value_before).float(), expected)
    assert torch.equal(torch.from_numpy(records.value_after).float(), -expected)


# ---------------------------------------------------------------- coverage of torchvision architectures


@pytest.mark.parametrize("arch,parameters", [
    ("vit_b_16", 85_806_346), ("swin_t", 27_527_044), ("maxvit_t", 30_412_744), ("convnext_tiny", 27_827_818),
    ("efficientnet_b0", 4_020_358), ("mobilenet_v3_small", 1_528_106), ("resnet18", 11_181_642)])
def test_param_sites_cover_every_parameter_of_torchvision_classifiers(arch, parameters):
    """No forward pass needed: param sites are the model's tensors (random weights, 10 classes)."""
    model = load_model(f"torchvision:{arch}", weights="none")
    params, _ = param_sites(model)
    chosen = select_params(params)
    assert sum(p.numel for p in chosen) == sum(p.numel() for p in model.parameters()) == parameters
    assert not any(p.buffer for p in chosen)
    assert {p.name for p in chosen} == {n for n, _ in model.named_parameters()}


def test_torchvision_vit_layers_report_attention_sites_and_coverage():
    """vit_b_16's own blocks at 32x32 (4 patches): the issue's 66.7% weight coverage, and
    100% with param sites; the 12 attention calls are now sites."""
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32, num_classes=10).eval()
    found = survey(model, (3, 32, 32))
    chosen, problems = select_campaign_sites(found, ("neuron", "weight", "param"))
    assert problems == [] and (len(chosen["neuron"]), len(chosen["weight"]), len(chosen["param"])) == (113, 51, 152)
    assert sum(s.module_type == "MultiheadAttention" for s in chosen["neuron"]) == 12
    lines = coverage_lines(model, found, chosen)
    assert lines[0] == "weight sites cover 57,239,808 of 85,658,890 parameters (66.8%)"  # the 57,239,808
    assert lines[1] == "param sites cover 85,658,890 of 85,658,890 parameters (100.0%)"  # 4 position embeddings at 32x32
    assert lines[2].startswith("leaf modules that never ran as a module (12; ")


# ---------------------------------------------------------------- selection


def test_param_patterns_globs_regex_types_and_buffers():
    params, non_floating = param_sites(plain_net())
    names = lambda chosen: [p.name for p in chosen]  # noqa: E731
    assert names(select_params(params, "*.bias")) == ["0.bias", "1.bias", "4.bias", "7.bias", "10.bias"]
    assert names(select_params(params, r"re:(0|10)\.weight")) == ["0.weight", "10.weight"]
    assert names(select_params(params, "*.bias", types="Linear")) == ["7.bias", "10.bias"]
    assert names(select_params(params, "1.*", buffers=True)) == ["1.weight", "1.bias", "1.running_mean", "1.running_var"]
    assert len(select_params(params)) == 10 and len(select_params(params, buffers=True)) == 12
    assert parse_patterns("*.bias, re:a,b") == ["*.bias", "re:a,b"] and parse_patterns("all") is None
    with pytest.raises(ValueError, match=r"'\*\.gamma' matches no parameter; this model has: 0\.weight, 0\.bias, "):
        select_params(params, "*.gamma")
    with pytest.raises(ValueError, match=r"not floating and cannot be flipped: 1\.num_batches_tracked \(int64\)"):
        select_params(params, "*.num_batches_tracked", buffers=True, non_floating=non_floating)
    with pytest.raises(ValueError, match=r"matches only buffers \(1\.running_mean\): add --buffers"):
        select_params(params, "*.running_mean")
    with pytest.raises(ValueError, match="owned by layer type.*ReLU; their owners are: BatchNorm2d, Conv2d, Linear"):
        select_params(params, types="ReLU")
    with pytest.raises(ValueError, match="bad regular expression"):
        select_params(params, "re:(")


def test_module_patterns_by_type_name_glob_and_errors(vit_bench):
    found = survey(vit_bench.model, (1, 28, 28))
    blocks = match_modules(found, "EncoderBlock")
    assert [s.name for s in blocks] == [f"encoder.layers.encoder_layer_{i}" for i in range(4)]
    assert all(s.container and s.index >= 28 for s in blocks)
    assert [s.name for s in match_modules(found, "encoder.layers.encoder_layer_1.mlp.*")] == [
        "encoder.layers.encoder_layer_1.mlp.0", "encoder.layers.encoder_layer_1.mlp.1", "encoder.layers.encoder_layer_1.mlp.2"]
    assert [s.index for s in match_modules(found, "re:.*self_attention")] == [3, 9, 15, 21]
    with pytest.raises(ValueError, match="'Block' matches no module name or type; module types: .*EncoderBlock"):
        match_modules(found, "Block")
    with pytest.raises(ValueError, match=r"never run as a module.*encoder_layer_0\.self_attention\.out_proj \(NonDyn"):
        match_modules(found, "encoder.layers.encoder_layer_0.self_attention.out_proj")


def test_campaign_selection_problems_are_one_line_each(vit_bench):
    found = survey(vit_bench.model, (1, 28, 28))
    chosen, problems = select_campaign_sites(found, ("neuron", "weight", "param"), params="*.bias", modules="EncoderBlock")
    assert problems == []
    assert [s.index for s in chosen["neuron"]] == [29, 31, 33, 35]  # block i ends after its MLPBlock (28, 30, ...)
    assert len(chosen["weight"]) == 19  # with modules, weight sites keep their own selection
    assert all(p.name.endswith(".bias") for p in chosen["param"]) and len(chosen["param"]) == 23  # not in_proj_bias
    chosen, problems = select_campaign_sites(found, ("weight", "param"), layer_types="LayerNorm")
    assert problems == [] and [s.index for s in chosen["weight"]] == [2, 4, 8, 10, 14, 16, 20, 22, 26]
    assert len(chosen["param"]) == 18 and {p.module_type for p in chosen["param"]} == {"LayerNorm"}
    _, problems = select_campaign_sites(found, ("weight",), params="*.bias", modules="EncoderBlock", buffers=True)
    assert problems == ["params: names param sites, but --sites has no param: add param to --sites",
                        "buffers: buffers are param sites, but --sites has no param: add param to --sites",
                        "modules: module outputs are neuron sites, but --sites has no neuron: add neuron to --sites"]
    _, problems = select_campaign_sites(found, ("param",), layers="3")
    assert problems == ["layers: indices select neuron and weight sites; select param sites by name with --params"]


# ---------------------------------------------------------------- oracles


def _bitstring_state_edit(model, name, position, bit):
    """A copy of ``model`` whose state_dict entry ``name`` has element ``position`` flipped by bitstring."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flat = state[name].view(-1)
    flat[position] = bitstring_flip(float(flat[position]), bit, flat.dtype)
    edited = copy.deepcopy(model)
    edited.load_state_dict(state)
    return edited


@pytest.mark.parametrize("bit,prefix", [(30, False), ("random", False), (30, True)])  # prefix: the campaigns' default path
def test_param_faults_equal_a_bitstring_edit_of_a_state_dict_copy(vit_bench, bit, prefix):
    bench, per_fault = vit_bench, 32
    names = ["class_token", "encoder.pos_embedding", f"{MHA.format(1)}.in_proj_weight", f"{MHA.format(2)}.out_proj.bias",
             "encoder.layers.encoder_layer_3.ln_2.weight", "heads.head.bias"]
    changed, paths = 0, set()
    for site in [p for p in bench.params if p.name in names]:
        outcome = engine.run_faults(bench, site, "param", bit, seed=11, images_per_weight_fault=per_fault, record="all",
                                    prefix=prefix)
        r = outcome.records
        paths.add(outcome.path)
        for group in range(bench.num_images // per_fault):
            rows = r.fault_group == group
            assert len(set(r.position[rows])) == 1 and len(set(r.bit[rows])) == 1
            edited = _bitstring_state_edit(bench.model, site.name, int(r.position[rows][0]), int(r.bit[rows][0]))
            with torch.inference_mode():
                expected = edited(bench.images[group * per_fault : (group + 1) * per_fault]).argmax(1)
            assert r.faulty[rows].tolist() == expected.tolist(), (site.name, group)
        changed += int(r.changed.sum())
    assert changed > (100 if bit == 30 else 20)  # the comparison covers real prediction changes
    assert paths == {"prefix" if prefix else "full"}


def _bitstring_output_hook(positions, bits, call):
    """A hand-written forward hook: on call ``call`` flip element positions[i] of image i of
    the output (element 0 of a tuple) with bitstring, one Python call per image."""
    seen = {"calls": 0}

    def hook(_module, _inputs, output):
        seen["calls"] += 1
        if seen["calls"] - 1 != call:
            return None
        tensor = output[0] if isinstance(output, tuple) else output
        out = tensor.contiguous().clone()
        flat = out.view(out.shape[0], -1)
        for i in range(out.shape[0]):
            flat[i, positions[i]] = bitstring_flip(float(flat[i, positions[i]]), int(bits[i]), out.dtype)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook


@pytest.mark.parametrize("bit,prefix", [(30, False), ("random", False), (30, True)])
def test_attention_and_block_faults_equal_a_hand_written_bitstring_hook(vit_bench, bit, prefix):
    bench = vit_bench
    sites = [s for s in bench.sites if s.module_type in ("MultiheadAttention", "EncoderBlock")]
    assert len(sites) == 8
    changed, paths = 0, set()
    for site in sites:
        outcome = engine.run_faults(bench, site, "neuron", bit, seed=5, record="all", prefix=prefix)
        r = outcome.records
        paths.add(outcome.path)
        predictions = []
        for lo in range(0, bench.num_images, bench.batch_size):
            hi = min(lo + bench.batch_size, bench.num_images)
            module = bench.model.get_submodule(site.name)
            handle = module.register_forward_hook(_bitstring_output_hook(r.position[lo:hi], r.bit[lo:hi], site.call))
            try:
                with torch.inference_mode():
                    predictions += bench.model(bench.images[lo:hi]).argmax(1).tolist()
            finally:
                handle.remove()
        assert r.faulty.tolist() == predictions, site.name
        changed += int(r.changed.sum())
    assert changed > 100 or bit != 30  # random bits (random weights) rarely change a prediction: bit 30 does
    assert paths == {"prefix" if prefix else "full"}


# ---------------------------------------------------------------- integrity and reproducibility


def test_state_dict_bit_identical_after_param_trials_even_when_forward_raises():
    model = plain_net()
    bench = engine.prepare(model, make_data(100), batch_size=32, device="cpu")
    before = state_bits(model)
    for site in bench.params:  # buffers included
        engine.run_faults(bench, site, "param", "random", seed=2, images_per_weight_fault=10)
    assert all(torch.equal(before[k], v) for k, v in state_bits(model).items())
    calls = {"n": 0}

    def explode(_m, _i, _o):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")

    handle = model[8].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            engine.run_faults(bench, bench.site("param", 4), "param", 30, seed=1, images_per_weight_fault=16)
    finally:
        handle.remove()
    assert all(torch.equal(before[k], v) for k, v in state_bits(model).items())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_param_fault_lists_do_not_depend_on_batch_size_and_differ_from_weight_draws():
    records = []
    for batch_size in (1, 7, 256):
        bench = engine.prepare(plain_net(), make_data(100), batch_size=batch_size, device="cpu")
        records.append(engine.run_faults(bench, bench.site("param", 8), "param", "random", seed=3,
                                         images_per_weight_fault=16, record="all").records)
    for other in records[1:]:
        for column in ("position", "bit", "fault_group", "faulty"):
            assert np.array_equal(records[0].__dict__[column], other.__dict__[column]), column
    weight = engine.run_faults(bench, bench.site("weight", 8), "weight", "random", seed=3, images_per_weight_fault=16,
                               record="all").records
    assert len(set(records[0].position)) == 7 and records[0].position.tolist() != weight.position.tolist()
    with pytest.raises(ValueError, match="param faults need a ParamSite"):
        engine.run_faults(bench, bench.site("weight", 8), "param", 1, seed=1)


def test_token_inputs_have_no_input_site_and_start_at_the_embedding():
    data = load_dataset("synthetic-tokens:16:1000:4:64")
    model = load_model("demo:text")
    bench = engine.prepare(model, (data.images, data.labels), batch_size=32, device="cpu")
    assert bench.images.dtype == torch.int64
    leaves = [s for s in bench.sites if not s.container]
    assert (leaves[0].index, leaves[0].name, leaves[0].output_shape) == (1, "embedding", (16, 32))
    assert bench.site("neuron", 0) is None and [s.index for s in leaves] == list(range(1, len(leaves) + 1))
    attention = next(s for s in leaves if s.module_type == "MultiheadAttention")
    assert attention.output_index == 0
    outcome = engine.run_faults(bench, leaves[0], "neuron", 30, seed=1, record="all")
    assert outcome.counts.images == 64 and outcome.records.position.max() < 16 * 32
    found = survey(model, (16,), torch.float32, input_dtype=torch.int64)
    _, problems = select_campaign_sites(found, ("neuron",), layers="0")
    assert problems == [f"layers: neuron site index(es) 0 do not exist; valid: 1-{len(leaves)}"]


# ---------------------------------------------------------------- spec, trial rows, CLI


def test_spec_resolves_param_and_module_sites_into_distinct_trials():
    spec = CampaignSpec(model="demo:vit", weights="none", images=64, sites=("neuron", "weight", "param"),
                        params="*.bias,class_token", modules="EncoderBlock,MultiheadAttention", prefix=False)
    plan = resolve(spec)
    assert plan.sites_by_kind["neuron"] == [3, 9, 15, 21, 29, 31, 33, 35]
    assert plan.sites_by_kind["weight"] == [1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 26, 27]
    names = [n for n, _ in load_model("demo:vit", weights="none").named_parameters()]
    assert plan.sites_by_kind["param"] == [i for i, n in enumerate(names) if n.endswith(".bias") or n == "class_token"]
    keys = {f"{t.kind}-{t.site}" for t in plan.trials}
    assert len(keys) == len(plan.trials) and "param-1" not in keys and "weight-1" in keys  # 1 = conv_proj.weight
    identity = plan.identity()
    assert (identity["params"], identity["modules"], identity["buffers"]) == ("*.bias,class_token",
                                                                               "EncoderBlock,MultiheadAttention", None)
    assert "Param #" in plan.site_table and "[container]" in plan.site_table
    assert [n[:54] for n in plan.notes] == ["sites: leaf modules that never ran as a module (4; not"]  # said before it runs
    default = resolve(CampaignSpec(model="demo:vgg", weights="none", images=64)).identity()
    assert (default["params"], default["modules"], default["buffers"]) == (None, None, None)


@pytest.mark.parametrize("overrides,message", [
    (dict(sites=("param",), params="*.gamma"), r"^params: '\*\.gamma' matches no parameter; this model has: class_token,"),
    (dict(sites=("param",), params="*.running_mean"), r"^params: '\*\.running_mean' matches no parameter"),
    (dict(sites=("neuron",), modules="Block"), r"^modules: 'Block' matches no module name or type; module types:"),
    (dict(sites=("neuron",), modules="*.out_proj"), r"^modules: '\*\.out_proj' matches only modules that never run"),
    (dict(sites=("neuron", "param", "neuron")), "names a kind twice"),
    (dict(sites=("weight",), buffers=True), "^buffers: buffers are param sites"),
])
def test_bad_site_specs_fail_before_any_work_with_one_line(overrides, message):
    with pytest.raises(SpecError, match=message) as info:
        resolve(CampaignSpec(model="demo:vit", weights="none", images=32, **overrides))
    assert "\n" not in str(info.value)


def test_trial_rows_and_fault_rows_carry_param_names_and_output_elements(tmp_path):
    settings = CampaignSettings(name="t", directory=str(tmp_path), model="demo:vit", dataset="fashion-mnist",
                                weights="none", images=96, batch_size=48, images_per_weight_fault=32, record="all")
    param = run_trial(settings, TrialPoint("param", 0, 30, 4))  # class_token
    attention = run_trial(settings, TrialPoint("neuron", 3, 30, 4))
    assert (param["site_name"], param["site_call"], param["site_type"], param["site_output_index"]) == (
        "class_token", None, "DemoViT", None)
    assert param["trial_key"] == "param-s0000-b30-seed4" and param["images_per_weight_fault"] == 32
    assert (attention["site_name"], attention["site_call"], attention["site_output_index"]) == (MHA.format(0), 0, 0)
    faults = pd.read_parquet(tmp_path / "faults" / "param-s0000-b30-seed4.parquet")
    assert set(faults["site_name"]) == {"class_token"} and len(faults) == 96 and set(faults["fault_group"]) == {0, 1, 2}
    rows = pd.read_parquet(tmp_path / "parts" / "trials").set_index("trial_key")["site_output_index"]
    assert pd.isna(rows["param-s0000-b30-seed4"]) and rows["neuron-s0003-b30-seed4"] == 0


def test_yaml_keys_and_flags_for_the_site_filters(tmp_path):
    (tmp_path / "c.yaml").write_text("sites: [neuron, param]\nparams: ['*.bias', 're:heads\\..*']\nmodules: EncoderBlock\n"
                                     "buffers: true\n")
    args = build_parser().parse_args(["run", str(tmp_path / "c.yaml"), "--modules", "MultiheadAttention,layer2.1"])
    spec = spec_from_args(args, env={})
    assert (spec.sites, spec.params, spec.modules, spec.buffers) == (
        ("neuron", "param"), r"*.bias,re:heads\..*", "MultiheadAttention,layer2.1", True)
    assert parse_patterns(spec.params) == ["*.bias", r"re:heads\..*"]
    flags = build_parser().parse_args(["layers", "--sites", "param", "--params", "*.weight", "--buffers"])
    assert (flags.sites, flags.params, flags.buffers) == ("param", "*.weight", True)


def test_layers_command_says_what_the_sites_cover(capsys):
    assert main(["layers", "--model", "demo:vit", "--weights", "none", "--sites", "neuron,weight,param"]) == 0
    total = sum(p.numel() for p in load_model("demo:vit", weights="none").parameters())
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("demo:vit on fashion-mnist input [1, 28, 28]: 28 neuron sites, 19 weight sites, 56 param sites")
    assert f"param sites cover {total:,} of {total:,} parameters (100.0%)" in lines
    assert any(line.startswith("leaf modules that never ran as a module (4; ") and
               f"{MHA.format(3)}.out_proj (NonDynamicallyQuantizableLinear)" in line for line in lines)
    assert "calls that are no neuron sites: none" in lines
    assert any(line.split()[:2] == ["3", "MultiheadAttention"] and line.endswith("[output element 0]") for line in lines)
    assert main(["layers", "--model", "demo:vit", "--weights", "none", "--sites", "param", "--params", "*.gamma"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: params: '*.gamma' matches no parameter; this model has: class_token, ")


def test_a_campaign_of_the_text_demo_resolves_with_a_state_dict_digest(tmp_path):
    """demo:text ships no weights: its identity is the digest of its seeded random state_dict."""
    resolved = resolve(CampaignSpec(model="demo:text", dataset="synthetic-tokens:16:1000:4:32", sites=("neuron",),
                                    layers="1", bits="30", out=str(tmp_path), name="text"))
    assert [(t.kind, t.site) for t in resolved.trials] == [("neuron", 1)]
    assert resolved.inputs["weights_sha256"].startswith("state_dict:")
    assert not any(tmp_path.iterdir())  # resolving writes nothing
