"""The model-source registry and its open-world sources, offline: py: factories written here,
timm models with random weights, torch.hub repositories in tmp_path, tiny Hugging Face ViT
and BERT classifiers built from configs; entry-point plugins; safetensors weights; bad input
in one line with nothing created."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from campaign import cli
from campaign.runner import record_spec, settings_for
from campaign.spec import CampaignSpec, SpecError, resolve, spec_from_yaml
from tests.test_models import write_hub
from trainables.inject import engine
from trainables.inject.reference import bitstring_flip
from trainables.inject.suffix import fallback_reasons
from trainables.zoo import sources
from trainables.results import aggregate
from trainables.trial import CampaignSettings, TrialPoint, run_trial
from trainables.zoo.data import load_dataset, sha256_file
from trainables.zoo.models import check_model_name, code_digest, load_model
from trainables.zoo.sources import ModelSource, hf, timm as timm_source

ROOT = Path(__file__).resolve().parents[1]

FACTORY = '''
import torch
from torch import nn


def build(width=4, num_classes=10, bias=True):
    torch.manual_seed(width)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width, bias=bias), nn.ReLU(), nn.Linear(width, num_classes))


def seven(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 7))


def flat():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1), nn.Flatten(0))


def not_a_model():
    return 42
'''


def write_module(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """tmp_path as the working directory, as `python -m campaign` there would have it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


# ---------------------------------------------------------------- the registry


def test_registry_has_every_source_and_names_them_in_errors():
    assert sources.source_prefixes()[:8] == ["chenyaofo", "torchvision", "file", "demo", "py", "timm", "hub", "hf"]
    with pytest.raises(ValueError) as info:
        check_model_name("nope:x")
    for form in ("py:<module>:<callable>", "timm:<name>", "hub:<owner>/<repo>[@ref]:<entry>", "hf:<directory"):
        assert form in str(info.value)
    assert "memory:" not in str(info.value)  # campaign.run's in-memory models are not typed by users
    with pytest.raises(ValueError, match=r"^memory:model-0 is an in-memory object of the Python session that ran "
                                         r"campaign.run\(...\): run it there again"):
        check_model_name("memory:model-0")
    with pytest.raises(ValueError, match="prefix 'timm' is built in"):
        sources.register_model_source(ModelSource("timm", "timm:<x>", lambda rest, opts: nn.Identity()))


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """An installed distribution (a dist-info on sys.path) declaring two entry points of the
    group bitflip_campaigns.models: a working loader and one whose module does not exist."""
    write_module(tmp_path, "toyplugin", '''
        from torch import nn

        def load(rest, opts):
            return nn.Sequential(nn.Flatten(), nn.Linear(int(rest), opts.num_classes or 3))
    ''')
    info = tmp_path / "toyplugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[bitflip_campaigns.models]\ntoy = toyplugin:load\n"
                                           "broken = no_such_plugin_module:load\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sources.reload_entry_points()
    yield tmp_path
    monkeypatch.undo()
    sources.reload_entry_points()


def test_entry_point_plugins_add_prefixes_and_a_broken_one_fails_alone(plugin_dir):
    assert {"toy", "broken"} <= set(sources.source_prefixes())
    model = load_model("toy:12", num_classes=5)
    assert isinstance(model[1], nn.Linear) and (model[1].in_features, model[1].out_features) == (12, 5)
    assert not model.training
    with pytest.raises(ValueError) as info:
        load_model("broken:x")
    assert "model source 'broken'" in str(info.value) and "no_such_plugin_module" in str(info.value)
    assert "\n" not in str(info.value)
    check_model_name("demo:vgg")  # the others are unaffected


# ---------------------------------------------------------------- model_args


def test_model_args_from_flags_and_yaml_are_typed(tmp_path):
    args = cli.build_parser().parse_args(["run", "--model", "py:m:f", "--model-arg", "width=8", "--model-arg", "scale=0.5",
                                          "--model-arg", "bias=false", "--model-arg", "act=relu"])
    assert cli.spec_from_args(args, env={}).model_args == {"width": 8, "scale": 0.5, "bias": False, "act": "relu"}
    (tmp_path / "s.yaml").write_text("model: py:m:f\nmodel_args:\n  width: 8\n  act: relu\n")
    assert spec_from_yaml(tmp_path / "s.yaml").model_args == {"width": 8, "act": "relu"}
    bad = cli.build_parser().parse_args(["run", "--model-arg", "novalue"])
    with pytest.raises(SpecError, match=r"^model_args: cannot read \['novalue'\] as keyword=value pairs"):
        cli.spec_from_args(bad, env={})
    with pytest.raises(ValueError, match="demo: models take no model_args"):
        load_model("demo:vgg", model_args={"width": 3})


# ---------------------------------------------------------------- py:


def test_py_factory_gets_model_args_and_classes_and_takes_safetensors_weights(in_tmp):
    write_module(in_tmp, "nets_a", FACTORY)
    model = load_model("py:nets_a:build", num_classes=6, model_args={"width": 5, "bias": False})
    assert (model[1].out_features, model[1].bias, model[3].out_features) == (5, None, 6)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    other = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    save_file(other, str(in_tmp / "w.safetensors"))
    torch.save(other, in_tmp / "w.pth")
    for weights in ("w.safetensors", "w.pth"):
        loaded = load_model("py:nets_a:build", num_classes=6, model_args={"width": 5, "bias": False}, weights=weights)
        assert all(torch.equal(loaded.state_dict()[k], other[k]) for k in other)
    (in_tmp / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors file"):
        load_model("py:nets_a:build", weights="bad.safetensors")


def test_py_code_digest_covers_the_factory_and_its_package(in_tmp):
    path = write_module(in_tmp, "nets_b", FACTORY)
    first = code_digest("py:nets_b:build")
    assert first[0] == "code_sha256" and first == code_digest("py:nets_b:build")
    path.write_text(path.read_text() + "\n# edited\n")
    assert code_digest("py:nets_b:build") != first
    package = in_tmp / "netpkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write_module(package / "sub", "__init__", "")
    write_module(package / "sub", "factory", "from netpkg.helpers import build\n")
    helper = write_module(package, "helpers", FACTORY)
    before = code_digest("py:netpkg.sub.factory:build")
    helper.write_text(helper.read_text().replace("784", "28 * 28"))  # a helper of the factory changes
    assert code_digest("py:netpkg.sub.factory:build") != before
    assert isinstance(load_model("py:netpkg.sub.factory:build"), nn.Sequential)


BAD_MODELS = [
    (["--model", "py:nets_boom:build"], "py: module 'nets_boom' failed to import: RuntimeError: boom at import"),
    (["--model", "py:nets_dep:build"], "py: module 'nets_dep' failed to import: ModuleNotFoundError: No module named "
                                       "'not_installed_anywhere'"),
    (["--model", "py:nets_missing:build"], "py: module 'nets_missing' was not found in the working directory"),
    (["--model", "py:nets_c:nothing"], "py: module 'nets_c' ("),
    (["--model", "py:nets_c:not_a_model"], "py:nets_c:not_a_model returned a int, not a torch.nn.Module"),
    (["--model", "py:nets_c:flat"], "model output must be (batch, classes) float logits; got (2,) for a batch of 2"),
    (["--model", "py:nets_c:seven"], "gives logits for 7 classes, fashion-mnist has 10: the model's output must be (N, 10)"),
    (["--model", "py:nets_c:build", "--model-arg", "depth=3"], "py: build takes no argument 'depth'"),
    (["--model", "py:nets_c"], "bad model name py:'nets_c': use py:<module>:<callable>"),
    (["--model", "timm:resnet_nonexistent"], "unknown timm model 'resnet_nonexistent'"),
    (["--model", "timm:resnet18", "--model-arg", "no_such_option=1"], "timm:resnet18: create_model("),
    (["--model", "hf:/nonexistent/model/dir"], "hf: model directory /nonexistent/model/dir does not exist"),
    (["--model", "hub:someone/repo:entry", "--hub-dir", "/nonexistent"], "hub_dir /nonexistent has no hubconf.py"),
    (["--model", "hub:not-a-hub-name"], "bad model name hub:'not-a-hub-name'"),
    (["--model", "py:nets_c:build", "--weights", "missing.safetensors"], "weights file missing.safetensors does not exist"),
]


@pytest.mark.parametrize("flags,message", BAD_MODELS, ids=[m[:40] for _, m in BAD_MODELS])
def test_bad_models_are_one_line_and_create_nothing(in_tmp, capsys, flags, message):
    write_module(in_tmp, "nets_boom", "raise RuntimeError('boom at import')\n")
    write_module(in_tmp, "nets_dep", "import not_installed_anywhere\n")
    write_module(in_tmp, "nets_c", FACTORY)
    out = in_tmp / "runs"
    code = cli.main(["run", *flags, "--dataset", "fashion-mnist", "--images", "8", "--out", str(out), "--name", "x"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not out.exists()


def _campaign_frames(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    trials = pd.read_parquet(directory / "trials.parquet").sort_values("trial_key").reset_index(drop=True)
    faults = pd.read_parquet(directory / "faults").sort_values(["trial_key", "image"]).reset_index(drop=True)
    return trials, faults


def test_py_campaign_equals_the_engine_and_a_changed_factory_is_refused_on_resume(in_tmp, capsys):
    path = write_module(in_tmp, "nets_run", FACTORY)
    spec = CampaignSpec(model="py:nets_run:build", model_args={"width": 12}, dataset="fashion-mnist", images=96,
                        sites=("neuron",), layers="2-3", bits="30", record="all", out=str(in_tmp / "runs"), name="c")
    plan, (trials, faults) = _run_in_process(spec)
    assert trials["site_name"].tolist() == ["1", "2"] and (trials["images"] == 96).all()
    data = load_dataset("fashion-mnist", limit=96)  # the engine on the same model and data: same faults and predictions
    bench = engine.prepare(load_model("py:nets_run:build", num_classes=10, model_args={"width": 12}),
                           (data.images, data.labels), device="cpu")
    for row in trials.itertuples():
        direct = engine.run_faults(bench, bench.site("neuron", row.site_index), "neuron", 30, row.seed, record="all")
        mine = faults[faults["trial_key"] == row.trial_key]
        assert mine["position"].tolist() == direct.records.position.tolist()
        assert mine["faulty"].tolist() == direct.records.faulty.tolist()
    spec_json = json.loads((in_tmp / "runs" / "c" / "spec.json").read_text())
    assert spec_json["identity"]["model_args"] == {"width": 12} and len(spec_json["identity"]["code_sha256"]) == 64
    path.write_text(path.read_text() + "\n# edited after the campaign\n")
    capsys.readouterr()
    assert cli.main(["resume", str(in_tmp / "runs" / "c")]) == 2
    err = capsys.readouterr().err
    assert "holds a different campaign" in err and "the model's code or configuration changed" in err
    assert err.count("\n") == 1


# ---------------------------------------------------------------- timm:


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0", "resnet18"])
def test_timm_param_sites_cover_every_parameter(name, capsys):
    import timm

    size = ["--model-arg", "img_size=32"] if name.startswith("vit") else []  # 32x32 inputs: a fast survey
    with torch.device("meta"):  # an independent count, without allocating
        total = sum(p.numel() for p in timm.create_model(name, pretrained=False, num_classes=10,
                                                           **({"img_size": 32} if size else {})).parameters())
    assert cli.main(["layers", "--model", f"timm:{name}", *size, "--dataset", "synthetic:3x32x32:10:2", "--sites",
                     "param"]) == 0
    out = capsys.readouterr().out
    assert f"param sites cover {total:,} of {total:,} parameters (100.0%)" in out


def _run_in_process(spec: CampaignSpec):
    """The campaign's trials through the function a Ray worker runs (run_trial), without Ray
    (the Ray paths: the job-submit and notebook tests); returns the plan and the aggregated
    (trials, faults) frames."""
    plan = resolve(spec)
    record_spec(plan)  # spec.json, as a campaign writes it: resume reads it
    settings = CampaignSettings.from_dict(settings_for(plan))
    for t in plan.trials:
        run_trial(settings, TrialPoint(t.kind, t.site, t.bit, t.seed, t.fault))
    aggregate(plan.directory)
    return plan, _campaign_frames(Path(plan.directory))


def test_timm_campaign_with_safetensors_weights_equals_the_engine(tmp_path):
    import timm

    torch.manual_seed(7)
    trained = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    save_file(trained.state_dict(), str(tmp_path / "resnet18.safetensors"))
    model = load_model("timm:resnet18", num_classes=10, weights=str(tmp_path / "resnet18.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    spec = CampaignSpec(model="timm:resnet18", weights=str(tmp_path / "resnet18.safetensors"),
                        dataset="synthetic:3x32x32:10:48", sites=("neuron", "weight"), layers="1,5", bits="30",
                        record="all", out=str(tmp_path / "runs"), name="t")
    plan, (trials, faults) = _run_in_process(spec)
    assert len(trials) == len(plan.trials) == 4  # neuron and weight sites 1 (conv1) and 5 (layer1.0.conv1)
    assert plan.inputs["weights_sha256"] == sha256_file(tmp_path / "resnet18.safetensors")
    data = load_dataset("synthetic:3x32x32:10:48")
    bench = engine.prepare(trained, (data.images, data.labels), device="cpu")
    for row in trials.itertuples():
        direct = engine.run_faults(bench, bench.site(row.kind, row.site_index), row.kind, 30, row.seed, record="all")
        assert faults[faults["trial_key"] == row.trial_key]["faulty"].tolist() == direct.records.faulty.tolist()
        assert row.mismatches == direct.counts.mismatches


def test_timm_data_config_for_the_data_side():
    config = timm_source.data_config("vit_tiny_patch16_224", {"img_size": 32})
    assert config["input_size"] == (3, 32, 32) and config["mean"] == pytest.approx((0.5, 0.5, 0.5))
    assert config["interpolation"] == "bicubic" and config["crop_pct"] == pytest.approx(0.9)


# ---------------------------------------------------------------- hub:

HUBCONF = '''
dependencies = ["torch"]
import torch
from torch import nn


def tiny(width=4, num_classes=10):
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


def _private():
    pass
'''


def test_hub_local_clone_entry_with_model_args_and_code_digest(tmp_path):
    hub_dir = tmp_path / "clone"
    hub_dir.mkdir()
    (hub_dir / "hubconf.py").write_text(HUBCONF)
    model = load_model("hub:someone/tinyrepo@v2:tiny", hub_dir=str(hub_dir), model_args={"width": 3, "num_classes": 5})
    assert (model[0].out_channels, model[4].out_features) == (3, 5) and not model.training
    with pytest.raises(ValueError, match=r"hubconf.py has no entry 'huge'; it has: tiny$"):
        load_model("hub:someone/tinyrepo:huge", hub_dir=str(hub_dir))
    first = code_digest("hub:someone/tinyrepo:tiny", hub_dir=str(hub_dir))
    (hub_dir / "hubconf.py").write_text(HUBCONF + "\n# edited\n")
    assert first[0] == "hub_code_sha256" and code_digest("hub:someone/tinyrepo:tiny", hub_dir=str(hub_dir)) != first


def test_chenyaofo_is_a_case_of_hub(tmp_path):
    hub_dir = write_hub(tmp_path / "zoo")
    zoo = load_model("chenyaofo:cifar10_resnet20", hub_dir=hub_dir)
    hub = load_model("hub:chenyaofo/pytorch-cifar-models:cifar10_resnet20", hub_dir=hub_dir,
                     model_args={"pretrained": True})
    assert zoo.state_dict().keys() == hub.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(zoo.state_dict().values(), hub.state_dict().values()))


# ---------------------------------------------------------------- hf:


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A tiny ViT for Fashion-MNIST's 1x28x28 images and a tiny BERT for 16-token sequences of
    a 100-word vocabulary, built from configs (random weights) and saved with their processors."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import (BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast, ViTConfig,
                              ViTForImageClassification, ViTImageProcessor)

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=16,
                                              num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                              num_labels=10))
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.286], image_std=[0.353]).save_pretrained(root / "vit")
    bert = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=32, num_labels=4))
    bert.save_pretrained(root / "bert")
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 100)}}
    tokenizer = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(root / "bert")
    return {"vit": root / "vit", "bert": root / "bert"}


HF_CASES = {  # data set, attention modules, classes
    "vit": ("fashion-mnist", "ViTAttention", 10),
    "bert": ("synthetic-tokens:16:100:4:64", "BertSelfAttention", 4),
}


def test_hf_models_keep_transformers_names_and_logits_and_expose_their_processors(hf_dirs):
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    reference_vit = None
    for key, auto, sample in (("vit", AutoModelForImageClassification, torch.randn(3, 1, 28, 28)),
                              ("bert", AutoModelForSequenceClassification, torch.randint(0, 100, (3, 16)))):
        model = load_model(f"hf:{hf_dirs[key]}", num_classes=HF_CASES[key][2])
        reference = auto.from_pretrained(hf_dirs[key], local_files_only=True).eval()
        assert list(model.state_dict()) == list(reference.state_dict())
        assert [n for n, _ in model.named_modules()][1:] == [n for n, _ in reference.named_modules()][1:]
        with torch.inference_mode():
            assert torch.equal(model(sample), reference(sample).logits)
        reference_vit = reference if key == "vit" else reference_vit
    other = {k: torch.randn(v.shape) for k, v in reference_vit.state_dict().items()}
    save_file(other, str(hf_dirs["vit"].parent / "other.safetensors"))
    loaded = load_model(f"hf:{hf_dirs['vit']}", weights=str(hf_dirs["vit"].parent / "other.safetensors"))
    assert all(torch.equal(loaded.state_dict()[k], other[k]) for k in other)
    assert type(hf.preprocessor(f"hf:{hf_dirs['vit']}")).__name__.startswith("ViTImageProcessor")
    tokenizer = hf.preprocessor(hf_dirs["bert"])
    assert tokenizer("w5 w7 nope")["input_ids"] == [5, 7, 1]
    assert (hf.task(hf_dirs["vit"]), hf.task(f"hf:{hf_dirs['bert']}")) == ("image", "text")
    with pytest.raises(ValueError, match="classifies 10 labels, the data set has 4 classes"):
        load_model(f"hf:{hf_dirs['vit']}", num_classes=4)


def _oracle_predictions(model: nn.Module, inputs: torch.Tensor, module_name: str, positions, bits) -> list[int]:
    """A hand-written forward hook: image i's output element positions[i] (element 0 of a
    tuple output) gets bit bits[i] flipped with bitstring, one Python call per image."""
    positions, bits = list(positions), list(bits)

    def hook(_module, _inputs, output):
        tensor = output[0] if isinstance(output, tuple) else output
        flipped = tensor.clone()
        flat = flipped.view(flipped.shape[0], -1)
        for i in range(flat.shape[0]):
            flat[i, int(positions[i])] = bitstring_flip(float(flat[i, int(positions[i])]), int(bits[i]), flat.dtype)
        return (flipped, *output[1:]) if isinstance(output, tuple) else flipped

    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        with torch.inference_mode():
            return model(inputs).argmax(1).tolist()
    finally:
        handle.remove()


def _check_against_oracle(key: str, hf_dirs, trials: pd.DataFrame, faults: pd.DataFrame) -> None:
    dataset, attention, _ = HF_CASES[key]
    assert set(trials["site_type"]) == {attention} and set(trials["site_output_index"]) == {0}
    model = load_model(f"hf:{hf_dirs[key]}")
    inputs = load_dataset(dataset, limit=48).images
    changed = 0
    for row in trials.itertuples():
        mine = faults[faults["trial_key"] == row.trial_key]
        assert mine["image"].tolist() == list(range(48))
        assert mine["faulty"].tolist() == _oracle_predictions(model, inputs, row.site_name, mine["position"], mine["bit"])
        changed += int(mine["changed"].sum())
    assert changed > 0  # the comparison covers real prediction changes


def _hf_spec(key: str, hf_dirs, tmp_path) -> CampaignSpec:
    dataset, attention, _ = HF_CASES[key]
    return CampaignSpec(model=f"hf:{hf_dirs[key]}", dataset=dataset, images=48, sites=("neuron",), modules=attention,
                        seeds=(1, 2), bits="30", record="all", out=str(tmp_path / "runs"), name=key)


@pytest.mark.parametrize("key", ["vit", "bert"])
def test_hf_campaign_on_attention_outputs_equals_a_hook_oracle(hf_dirs, tmp_path, key):
    plan, frames = _run_in_process(_hf_spec(key, hf_dirs, tmp_path))
    notes = [note for note in plan.notes if note.startswith("prefix reuse")]  # said once, before the campaign runs
    assert len(plan.trials) == 4 and len(notes) == 1  # two attention modules x two seeds
    assert notes[0].startswith(f"prefix reuse: hf:{hf_dirs[key]}: 2 neuron site(s) run the full forward pass")
    assert "torch.fx cannot trace HFLogits" in notes[0]
    _check_against_oracle(key, hf_dirs, *frames)


def test_hf_prefix_reuse_falls_back_to_the_full_pass_with_identical_results(hf_dirs):
    model = load_model(f"hf:{hf_dirs['vit']}")
    data = load_dataset("fashion-mnist", limit=16)
    bench = engine.prepare(model, (data.images, data.labels), batch_size=16, device="cpu", prefix=True)
    sites = [s for s in bench.sites if s.name in ("vit.layers.0.attention", "vit.layers.1.attention.o_proj")]
    assert len(sites) == 2
    reasons = fallback_reasons(model, [("neuron", s) for s in sites], data.images[:2])
    assert len(reasons) == 1 and next(iter(reasons))[1].startswith("torch.fx cannot trace HFLogits")
    for site in sites:
        reused = engine.run_faults(bench, site, "neuron", "random", 3, record="all", prefix=True)
        full = engine.run_faults(bench, site, "neuron", "random", 3, record="all", prefix=False)
        assert reused.path == "full"
        assert reused.records.faulty.tolist() == full.records.faulty.tolist()
        assert reused.records.position.tolist() == full.records.position.tolist()


def test_py_model_and_data_reach_the_two_node_cluster_through_ray_job_submit_working_dir(two_nodes, tmp_path,
                                                                                        monkeypatch):
    """`ray job submit --working-dir .` from a directory holding the checkout's packages, the
    user's model factory and data loader: both are installed on no node, the job's working dir
    carries them to the driver and the workers of both nodes; rows equal a direct trial."""
    import shutil

    from trainables.trial import CampaignSettings, TrialPoint, run_trial

    work = tmp_path / "work"
    for package in ("campaign", "trainables", "analysis", "data"):  # data: the shipped Fashion-MNIST split
        shutil.copytree(ROOT / package, work / package, ignore=shutil.ignore_patterns("__pycache__"))
    write_module(work, "nets_job", FACTORY)
    write_module(work, "data_job", """
        from trainables.zoo.data import load_dataset

        def load():
            data = load_dataset("fashion-mnist", limit=64)
            return data.images, data.labels
    """)
    out = tmp_path / "results"
    args = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", two_nodes["dashboard"],
            "--working-dir", ".", "--", "python", "-m", "campaign", "run", "--model", "py:nets_job:build",
            "--model-arg", "width=9", "--dataset", "py:data_job:load", "--sites", "neuron", "--layers", "2-3",
            "--bits", "30", "--out", str(out), "--name", "job"]
    env = {k: v for k, v in two_nodes["env"].items() if k != "PYTHONPATH"}
    result = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = pd.read_parquet(out / "job" / "trials.parquet").sort_values("site_index")
    assert trials["site_name"].tolist() == ["1", "2"] and (trials["images"] == 64).all()
    assert (trials["model"] == "py:nets_job:build").all() and (trials["dataset"] == "py:data_job:load").all()
    assert json.loads((out / "job" / "spec.json").read_text())["identity"]["model_args"] == {"width": 9}
    monkeypatch.syspath_prepend(str(work))
    settings = CampaignSettings(name="direct", directory=str(tmp_path / "direct"), model="py:nets_job:build",
                                dataset="fashion-mnist", images=64, record="none", model_args='{"width": 9}')
    for row in trials.itertuples():
        direct = run_trial(settings, TrialPoint("neuron", int(row.site_index), 30, int(row.seed)))
        assert (direct["golden_correct"], direct["changed"]) == (row.golden_correct, row.changed)


# ---------------------------------------------------------------- campaign.run (notebooks)

VOLATILE = ["campaign", "campaign_dir", "model", "dataset", "wall_s", "started_at", "worker", "device"]


def test_notebook_run_equals_the_same_campaign_from_the_cli(ray_address, tmp_path):
    import campaign

    import analysis

    settings = {"sites": "neuron,weight", "layers": "0-1", "bits": "30", "record": "all", "out": str(tmp_path)}
    assert cli.main(["run", "--model", "demo:vgg", "--dataset", "fashion-mnist", "--images", "64", "--sites",
                     settings["sites"], "--layers", "0-1", "--bits", "30", "--record", "all",
                     "--out", str(tmp_path), "--name", "cli"]) == 0
    data = load_dataset("fashion-mnist", limit=64)
    model = load_model("demo:vgg")
    trials = campaign.run(model, (data.images, data.labels), name="notebook", **settings)
    cli_trials, cli_faults = analysis.load(tmp_path / "cli"), _campaign_frames(tmp_path / "cli")[1]
    nb_faults = _campaign_frames(tmp_path / "notebook")[1]
    assert len(trials) == len(cli_trials) == 2 + 1  # neuron sites 0-1 + weight site 1
    columns = [c for c in cli_trials.columns if c not in VOLATILE]
    pd.testing.assert_frame_equal(trials[columns], cli_trials[columns])
    columns = [c for c in cli_faults.columns if c not in VOLATILE]
    pd.testing.assert_frame_equal(nb_faults[columns], cli_faults[columns])
    assert next(model.parameters()).dtype == torch.float32 and not model.training  # the caller's model is untouched
    # a factory and a Dataset of the same model and data are the same campaign: nothing runs again (same started_at)
    again = campaign.run(lambda: load_model("demo:vgg"), torch.utils.data.TensorDataset(data.images, data.labels),
                         name="notebook", **settings)
    pd.testing.assert_frame_equal(again.drop(columns=["campaign_dir"]), trials.drop(columns=["campaign_dir"]))
    with pytest.raises(ValueError, match=r"data: labels must lie in 0..9 \(10 classes\); got 10..10"):
        campaign.run(model, (data.images, torch.full((64,), 10)), num_classes=10, **settings)
    with pytest.raises(ValueError, match="model: the factory returned a str, not a torch.nn.Module"):
        campaign.run(lambda: "vgg", (data.images, data.labels), **settings)
