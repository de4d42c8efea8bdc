"""Campaign specs: layering, the seed's knobs, validation before anything runs."""
import subprocess
import sys

import pytest

from campaign import spec as spec_mod
from campaign.cli import build_parser, spec_from_args
from campaign.spec import (
    CampaignSpec,
    SpecError,
    parse_bits,
    resolve,
    spec_from_mapping,
    spec_from_seed_env,
    spec_from_yaml,
)
from trainables.inject.faults import derive_seeds

FAST = dict(model="demo:vgg", weights="none", images=64)


def test_flags_override_file_override_seed_env(tmp_path):
    (tmp_path / "c.yaml").write_text("model: demo:resnet\nbits: 0-3\nbatch_size: 64\nsites: [neuron]\n")
    args = build_parser().parse_args(["run", str(tmp_path / "c.yaml"), "--batch-size", "32"])
    spec = spec_from_args(args, env={"bit_flip_pos": "1", "batch_size": "512", "layer_num": "1,2"})
    assert (spec.model, spec.bits, spec.batch_size, spec.sites, spec.layers) == ("demo:resnet", "0-3", 32, ("neuron",), "1,2")


def test_seed_env_knobs_map_to_spec():
    spec = spec_from_seed_env({"model_name": "vgg19_bn", "dataset": "cifar100", "seed": "77", "bit_flip_pos": "0",
                               "layer_type": "Conv2d,Linear", "layer_nums": "3,4", "img_size": "32", "channels": "3"})
    assert spec.model == "chenyaofo:cifar100_vgg19_bn" and spec.dataset == "cifar100" and spec.seeds == (77,)
    assert spec.bits == "msb:0" and parse_bits(spec.bits, 32) == [31]  # their MSB-first 0 = our sign bit 31
    assert (spec.layer_types, spec.layers, spec.img_size, spec.channels) == ("Conv2d,Linear", "3,4", 32, 3)
    assert spec_from_seed_env({"seed": "-1", "bit_flip_pos": "-1"}).master_seed == -1
    assert spec_from_seed_env({"bit_flip_pos": "-1"}).bits == "random"
    assert spec_from_seed_env({"model_name": "demo:vgg"}).model == "demo:vgg"


@pytest.mark.parametrize("text,width,expected", [
    ("random", 32, ["random"]), ("30", 32, [30]), ("0-3", 32, [0, 1, 2, 3]), ("23,30,random", 32, [23, 30, "random"]),
    ("msb:1", 32, [30]), ("msb:1", 16, [14]), ("all", 16, list(range(16))), ("30,30", 32, [30]),
])
def test_parse_bits(text, width, expected):
    assert parse_bits(text, width) == expected


@pytest.mark.parametrize("text,message", [("32", r"allowed 0\.\.31"), ("x", "cannot read 'x'"), ("msb:40", r"outside 0\.\.31")])
def test_parse_bits_refuses(text, message):
    with pytest.raises(SpecError, match=message):
        parse_bits(text, 32)


def test_unknown_keys_and_bad_types_are_listed_together(tmp_path):
    with pytest.raises(SpecError) as info:
        spec_from_mapping({"modle": "x", "batch_size": "many", "images": 2.5})
    text = str(info.value)
    assert "unknown key 'modle'" in text and "batch_size: cannot read 'many'" in text and "images: cannot read 2.5" in text
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(SpecError, match="must hold a mapping"):
        spec_from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        spec_from_yaml(tmp_path / "broken.yaml")
    with pytest.raises(SpecError, match="does not exist"):
        spec_from_yaml(tmp_path / "missing.yaml")


def test_resolve_expands_trials_and_derives_seeds():
    plan = resolve(CampaignSpec(**FAST, bits="random,30", num_seeds=2, master_seed=5))
    assert plan.seeds == tuple(derive_seeds(5, 2)) and len(set(plan.seeds)) == 2
    assert plan.dataset == "fashion-mnist" and plan.num_images == 64
    n_neuron, n_weight = len(plan.sites_by_kind["neuron"]), len(plan.sites_by_kind["weight"])
    assert len(plan.trials) == 2 * 2 * (n_neuron + n_weight)
    assert set(plan.sites_by_kind["weight"]) < set(plan.sites_by_kind["neuron"])
    assert resolve(CampaignSpec(**FAST, master_seed=5)).seeds == plan.seeds[:1]  # deterministic


def test_combined_kinds_keep_weight_layers_of_the_selection():
    plan = resolve(CampaignSpec(**FAST, layers="0-3"))
    assert plan.sites_by_kind == {"neuron": [0, 1, 2, 3], "weight": [1, 2]}


@pytest.mark.parametrize("overrides,message", [
    (dict(model="demo:alexnet"), "unknown demo model 'alexnet'"),
    (dict(model="nozoo:x"), "demo:vgg"),
    (dict(dataset="mnist"), "mnist"),
    (dict(layers="99"), r"index\(es\) 99 do not exist; valid: 0-"),
    (dict(layer_types="Conv3d"), "unknown neuron layer type"),
    (dict(bits="32"), r"allowed 0\.\.31"),
    (dict(bits="16", dtype="bf16"), r"allowed 0\.\.15"),
    (dict(dtype="int8"), "unknown math mode 'int8'"),
    (dict(images=100000), "limit 100000 exceeds the 10000 images of fashion-mnist"),
    (dict(img_size=32), "img_size: 32 given, but fashion-mnist images are 28x28"),
    (dict(sites=("neuron", "bias")), "sites: bias"),
    (dict(record="some"), "record"),
    (dict(gpus_per_trial=0.5), "no CUDA GPU"),
])
def test_bad_specs_fail_with_one_clear_message(overrides, message, monkeypatch):
    monkeypatch.setattr(spec_mod, "_ray_declares_gpus", lambda: False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SpecError, match=message):
        resolve(CampaignSpec(**{**FAST, **overrides}))


def test_cli_rejects_bad_input_before_writing_anything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "campaign", "run", "--weights", "none", "--layers", "1,99",
                             "--out", str(tmp_path), "--name", "bad"], capture_output=True, text=True, cwd=spec_mod.Path(__file__).parents[1])
    assert result.returncode == 2
    assert result.stderr.startswith("error: layers:") and "99" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_run_help_documents_every_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for flag in ("--model", "--dataset", "--hub-dir", "--weights", "--sites", "--layers", "--bits", "--seeds", "--images",
                 "--dtype", "--batch-size", "--out", "--name", "--cpus-per-trial", "--gpus-per-trial", "--record",
                 "--target-margin", "--hub-ref", "--address"):
        assert flag in help_text
