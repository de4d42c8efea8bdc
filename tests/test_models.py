"""trainables.zoo.models: every model source offline (a local torch.hub directory and a fake hub
cache built here, torchvision random init, TorchScript and checkpoint files, hostile files)
and the shipped demo models' accuracy on the shipped Fashion-MNIST test split."""
from __future__ import annotations

import os
import textwrap
import urllib.error

import pytest
import torch
from torch import nn

from trainables.inject.sites import enumerate_sites
from trainables.zoo import models
from trainables.zoo.data import load_dataset, sha256_file
from trainables.zoo.demo_models import DemoResNet, DemoText, DemoVGG, DemoViT
from trainables.zoo.models import check_model_name, default_dataset_for, load_model

# Correct top-1 predictions on the 10,000 Fashion-MNIST test images, CPU fp32
# (trainables/zoo/weights/README.md: 91.78%, 91.20%, 89.18%).
DEMO_CORRECT = {"vgg": 9178, "resnet": 9120, "vit": 8918}
DEMO_SHA256 = {
    "vgg": "c99dfcdbb7af1dc99080bed92a39b900117f01b86a1d959644ed1f757c944004",
    "resnet": "4254cd16c73ef22882b9a6da91674da6d02c58a8a64568bd4dc787f95a9bd276",
    "vit": "0543e51eadcc27c6b0dc9f55bdcc99053758a00e345db7253f3acd3d720b5f6f",
}

HUBCONF = '''
dependencies = ["torch"]
import os
import torch
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))


class _Tiny(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


def _build(entry, num_classes, pretrained):
    model = _Tiny(num_classes)
    if pretrained:  # like the zoo: weights from a file the entry knows
        model.load_state_dict(torch.load(os.path.join(_HERE, entry + ".pt"), weights_only=True))
    return model


def cifar10_resnet20(pretrained=False, **kwargs):
    return _build("cifar10_resnet20", 10, pretrained)


def cifar100_custom(pretrained=False, **kwargs):
    return _build("cifar100_custom", 100, pretrained)
'''


def tiny_state(num_classes: int, value: float) -> dict[str, torch.Tensor]:
    """A state_dict for the hubconf's model with every element equal to ``value``."""
    shapes = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (num_classes, 4), "fc.bias": (num_classes,)}
    return {k: torch.full(s, value) for k, s in shapes.items()}


def write_hub(directory) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hubconf.py").write_text(textwrap.dedent(HUBCONF))
    torch.save(tiny_state(10, 0.5), directory / "cifar10_resnet20.pt")
    torch.save(tiny_state(100, 0.75), directory / "cifar100_custom.pt")
    return str(directory)


def all_equal(model: nn.Module, value: float) -> bool:
    return all(bool((p == value).all()) for p in model.state_dict().values())


@pytest.fixture
def hub_dir(tmp_path) -> str:
    return write_hub(tmp_path / "pytorch-cifar-models")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """torch.hub's cache directory pointed at an empty tmp dir; the network probe fails the
    test if called, unless a test replaces it."""
    saved = torch.hub.get_dir()
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    torch.hub.set_dir(str(cache))
    monkeypatch.setattr(models, "github_reachable", lambda: pytest.fail("probed the network"))
    yield cache
    torch.hub.set_dir(saved)


def _no_hub_load(*args, **kwargs):
    pytest.fail("torch.hub.load was called")


# ---------------------------------------------------------------- chenyaofo via torch.hub


def test_local_hub_dir_pretrained(hub_dir, hub_cache):
    model = load_model("chenyaofo:cifar10_resnet20", hub_dir=hub_dir)
    assert type(model).__name__ == "_Tiny" and not model.training
    assert all_equal(model, 0.5) and model.fc.out_features == 10
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())


def test_local_hub_dir_random_init_and_weights_file(hub_dir, hub_cache, tmp_path):
    random = load_model("chenyaofo:cifar10_resnet20", hub_dir=hub_dir, weights="none")
    assert not all_equal(random, 0.5)
    path = tmp_path / "mine.pt"
    torch.save(tiny_state(10, 0.25), path)
    mine = load_model("chenyaofo:cifar10_resnet20", hub_dir=hub_dir, weights=str(path))
    assert all_equal(mine, 0.25)
    torch.save(tiny_state(7, 0.25), path)
    with pytest.raises(ValueError, match=rf"{path} does not fit chenyaofo:cifar10_resnet20.*size mismatch for fc.weight"):
        load_model("chenyaofo:cifar10_resnet20", hub_dir=hub_dir, weights=str(path))


def test_local_hub_dir_allows_its_own_entries_only(hub_dir, hub_cache, tmp_path):
    custom = load_model("chenyaofo:cifar100_custom", hub_dir=hub_dir)
    assert all_equal(custom, 0.75) and custom.fc.out_features == 100
    check_model_name("chenyaofo:cifar100_custom", hub_dir=hub_dir)
    with pytest.raises(ValueError, match=r"has no entry 'cifar10_vgg11_bn'; it has: cifar100_custom, cifar10_resnet20"):
        load_model("chenyaofo:cifar10_vgg11_bn", hub_dir=hub_dir)
    with pytest.raises(ValueError, match="has no hubconf.py"):
        load_model("chenyaofo:cifar10_resnet20", hub_dir=str(tmp_path))


def test_hub_cache_is_used_without_network(hub_cache, monkeypatch):
    # torch.hub's own layout: <hub dir>/<owner>_<repo>_<ref>, checkpoints/<entry>-<hash>.pt
    write_hub(hub_cache / "chenyaofo_pytorch-cifar-models_master")
    (hub_cache / "checkpoints").mkdir()
    (hub_cache / "checkpoints" / "cifar10_resnet20-4118986f.pt").write_bytes(b"")
    assert all_equal(load_model("chenyaofo:cifar10_resnet20"), 0.5)
    write_hub(hub_cache / "chenyaofo_pytorch-cifar-models_v1.0")
    assert not all_equal(load_model("chenyaofo:cifar10_resnet20", hub_ref="v1.0", weights="none"), 0.5)


def test_offline_without_cache_says_what_to_pass(hub_cache, monkeypatch):
    monkeypatch.setattr(models, "github_reachable", lambda: False)
    monkeypatch.setattr(torch.hub, "load", _no_hub_load)
    with pytest.raises(ValueError) as info:
        load_model("chenyaofo:cifar10_resnet20")
    message = str(info.value)
    assert "github.com is unreachable" in message
    assert str(hub_cache / "chenyaofo_pytorch-cifar-models_master") in message
    assert "--hub-dir" in message and "--weights" in message and "--weights none" in message
    with pytest.raises(ValueError, match="chenyaofo_pytorch-cifar-models_v2"):
        load_model("chenyaofo:cifar10_resnet20", hub_ref="v2", weights="none")
    # the repository is cached but the pretrained weights are not
    write_hub(hub_cache / "chenyaofo_pytorch-cifar-models_master")
    with pytest.raises(ValueError, match=r"the pretrained weights of cifar10_resnet20 are not in .*checkpoints.*--weights none"):
        load_model("chenyaofo:cifar10_resnet20")


def test_online_path_calls_torch_hub_with_the_zoo(hub_cache, monkeypatch):
    calls = []

    def fake_load(repo, entry, **kwargs):
        calls.append((repo, entry, kwargs))
        return nn.Linear(3, 10)

    monkeypatch.setattr(models, "github_reachable", lambda: True)
    monkeypatch.setattr(torch.hub, "load", fake_load)
    model = load_model("chenyaofo:cifar100_vgg19_bn")
    assert isinstance(model, nn.Linear) and not model.training
    load_model("chenyaofo:cifar10_resnet56", hub_ref="v0.1", weights="none")
    assert calls == [
        ("chenyaofo/pytorch-cifar-models:master", "cifar100_vgg19_bn", {"pretrained": True, "trust_repo": True, "verbose": False}),
        ("chenyaofo/pytorch-cifar-models:v0.1", "cifar10_resnet56", {"pretrained": False, "trust_repo": True, "verbose": False}),
    ]


def test_network_errors_during_hub_load_say_what_to_pass(hub_dir, hub_cache, monkeypatch):
    def offline_load(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load", offline_load)
    with pytest.raises(ValueError, match=r"cannot load chenyaofo:cifar10_resnet20: network error \(\[Errno -3\].*--hub-dir.*--weights none"):
        load_model("chenyaofo:cifar10_resnet20", hub_dir=hub_dir)


@pytest.mark.parametrize("name", ["chenyaofo:cifar10_resnet18", "chenyaofo:imagenet_resnet20", "chenyaofo:resnet20", "chenyaofo:cifar10_"])
def test_unknown_zoo_entries_list_the_zoo(name, hub_cache, monkeypatch):
    monkeypatch.setattr(torch.hub, "load", _no_hub_load)
    for call in (load_model, check_model_name):
        with pytest.raises(ValueError) as info:
            call(name)
        for part in ("chenyaofo:<cifar10|cifar100>_<arch>", "resnet20", "vgg19_bn", "mobilenetv2_x1_4", "shufflenetv2_x2_0", "repvgg_a2", "--hub-dir"):
            assert part in str(info.value)


def test_zoo_num_classes_must_match_the_dataset(hub_cache):
    with pytest.raises(ValueError, match="chenyaofo:cifar10_resnet20 has 10 classes; got num_classes=100"):
        load_model("chenyaofo:cifar10_resnet20", num_classes=100)


# ---------------------------------------------------------------- torchvision


def test_torchvision_random_init_and_weights_file(tmp_path):
    model = load_model("torchvision:resnet18")
    assert model.fc.out_features == 10 and not model.training
    torch.manual_seed(1)
    source = load_model("torchvision:resnet18", num_classes=3)
    assert source.fc.out_features == 3
    path = tmp_path / "r18.pt"
    torch.save(source.state_dict(), path)
    loaded = load_model("torchvision:resnet18", num_classes=3, weights=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match=rf"{path} does not fit torchvision:resnet18 with 10 classes.*size mismatch for fc.weight"):
        load_model("torchvision:resnet18", weights=str(path))
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=rf"{path} does not fit torchvision:resnet18.*Missing key"):
        load_model("torchvision:resnet18", num_classes=3, weights=str(path))
    with pytest.raises(ValueError, match=r"weights file /nonexistent/w.pt does not exist"):
        load_model("torchvision:resnet18", weights="/nonexistent/w.pt")


def test_torchvision_unknown_arch():
    for call in (load_model, check_model_name):
        with pytest.raises(ValueError, match=r"unknown torchvision architecture 'resnet9000': e\.g\. resnet18, .*list_models\(\)"):
            call("torchvision:resnet9000")


# ---------------------------------------------------------------- file: TorchScript and checkpoints


def _small_vgg(seed: int) -> DemoVGG:
    torch.manual_seed(seed)
    return DemoVGG().eval()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_file_torchscript(tmp_path):
    source = _small_vgg(2)
    path = tmp_path / "vgg.ts"
    torch.jit.save(torch.jit.script(source), str(path))
    model = load_model(f"file:{path}")
    assert isinstance(model, torch.jit.ScriptModule) and not model.training
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_file_checkpoint_with_arch(tmp_path):
    source = _small_vgg(3)
    path = tmp_path / "ckpt.pt"
    torch.save({"arch": "demo:vgg", "state_dict": source.state_dict()}, path)
    model = load_model(f"file:{path}")
    assert isinstance(model, DemoVGG) and not model.training
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    r18 = load_model("torchvision:resnet18", num_classes=3)
    torch.save({"arch": "torchvision:resnet18", "num_classes": 3, "state_dict": r18.state_dict()}, path)
    assert load_model(f"file:{path}").fc.out_features == 3
    with pytest.raises(ValueError, match=r"saved for 'torchvision:resnet18' but arch='demo:vgg' was given"):
        load_model(f"file:{path}", arch="demo:vgg")
    torch.save({"arch": f"file:{path}", "state_dict": r18.state_dict()}, path)
    with pytest.raises(ValueError, match="must be a demo:, torchvision: or chenyaofo: name"):
        load_model(f"file:{path}")


def test_file_plain_state_dict_needs_arch(tmp_path):
    source = _small_vgg(4)
    path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), path)
    with pytest.raises(ValueError, match=rf"{path} holds a plain state_dict .* --model demo:vgg --weights {path}"):
        load_model(f"file:{path}")
    model = load_model(f"file:{path}", arch="demo:vgg")
    assert torch.equal(model.features[0].weight, source.features[0].weight)
    with pytest.raises(ValueError, match=rf"the state_dict in {path} does not fit demo:resnet.*Missing key"):
        load_model(f"file:{path}", arch="demo:resnet")
    wrong = source.state_dict()
    wrong["classifier.3.weight"] = torch.zeros(5, 128)
    torch.save(wrong, path)
    with pytest.raises(ValueError, match=rf"the state_dict in {path} does not fit demo:vgg.*size mismatch for classifier.3.weight"):
        load_model(f"file:{path}", arch="demo:vgg")
    torch.save({"state_dict": [1, 2, 3], "arch": "demo:vgg"}, path)
    with pytest.raises(ValueError, match=rf"{path} does not hold a state_dict"):
        load_model(f"file:{path}")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_file_missing_corrupt_and_truncated(tmp_path):
    missing = tmp_path / "nope.pt"
    for call in (load_model, check_model_name):
        with pytest.raises(ValueError, match=rf"model file {missing} does not exist"):
            call(f"file:{missing}")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=rf"cannot load {noise}: not a weights-only PyTorch checkpoint"):
        load_model(f"file:{noise}", arch="demo:vgg")
    good = tmp_path / "good.pt"
    torch.save({"arch": "demo:vgg", "state_dict": _small_vgg(5).state_dict()}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"cannot load {truncated}: not a weights-only PyTorch checkpoint"):
        load_model(f"file:{truncated}")
    script = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(_small_vgg(6)), str(script))
    cut = tmp_path / "cut.ts"
    cut.write_bytes(script.read_bytes()[: script.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"cannot load {cut}"):
        load_model(f"file:{cut}")


class Evil:
    """Unpickling this runs a shell command: a malicious checkpoint."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = Evil()
    evil.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"arch": "demo:vgg", "state_dict": evil}, path)
    with pytest.raises(ValueError, match=rf"cannot load {path}: .*arbitrary pickled objects are refused.*posix\.system"):
        load_model(f"file:{path}")
    with pytest.raises(ValueError, match=rf"cannot load {path}"):
        load_model("demo:vgg", weights=str(path))
    with pytest.raises(ValueError, match=rf"cannot load {path}"):
        load_model("torchvision:resnet18", weights=str(path))
    assert not marker.exists()


def test_file_with_weights_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(_small_vgg(7).state_dict(), path)
    with pytest.raises(ValueError, match="carries its own weights"):
        load_model(f"file:{path}", arch="demo:vgg", weights="none")


# ---------------------------------------------------------------- demo models


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist")


@pytest.mark.parametrize("name", ["vgg", "resnet", "vit"])
def test_shipped_demo_weights(name):
    path = models.demo_weights_path(name)
    assert path.stat().st_size < 2_000_000
    assert sha256_file(path) == DEMO_SHA256[name] == models.DEMO_WEIGHTS[name][1]
    state = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float32 for k, v in state.items() if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("name", ["vgg", "resnet", "vit"])
def test_demo_accuracy_on_the_shipped_test_split(name, fashion):
    model = load_model(f"demo:{name}")
    assert not model.training
    with torch.inference_mode():
        predictions = torch.cat([model(fashion.images[i : i + 1000]).argmax(1) for i in range(0, 10000, 1000)])
    assert int((predictions == fashion.labels).sum()) == DEMO_CORRECT[name]


def test_demo_vit_is_a_torch_nn_transformer():
    model = load_model("demo:vit")
    assert isinstance(model, DemoViT) and sum(p.numel() for p in model.parameters()) == 139_018
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attention) == 4 and all(m.batch_first and m.num_heads == 4 and m.embed_dim == 64 for m in attention)
    assert type(model.encoder.layers.encoder_layer_0).__name__ == "EncoderBlock"
    assert [type(m).__name__ for m in model.encoder.layers.encoder_layer_0.mlp] == ["Linear", "GELU", "Linear"]
    params = dict(model.named_parameters())
    assert params["class_token"].shape == (1, 1, 64) and params["encoder.pos_embedding"].shape == (1, 17, 64)
    assert params["conv_proj.weight"].shape == (64, 1, 7, 7) and params["heads.head.weight"].shape == (10, 64)
    assert "encoder.layers.encoder_layer_3.self_attention.in_proj_weight" in params
    with torch.inference_mode():
        assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match="classifies Fashion-MNIST's 10 classes; got num_classes=5"):
        load_model("demo:vit", num_classes=5)


def test_demo_text_takes_token_ids():
    tokens = load_dataset("synthetic-tokens:32:1000:4:6").images
    model = load_model("demo:text")  # no shipped weights: random initialization, the same every time
    assert isinstance(model, DemoText) and not model.training
    assert models.DEMO_WEIGHTS.get("text") is None
    with torch.inference_mode():
        logits = model(tokens)
        assert logits.shape == (6, 4) and logits.dtype == torch.float32
        assert torch.equal(load_model("demo:text", weights="none")(tokens), logits)
        assert load_model("demo:text", num_classes=7)(tokens[:, :5]).shape == (6, 7)  # any class count and length
    assert sum(isinstance(m, nn.MultiheadAttention) for m in model.modules()) == 1
    assert model.embedding.weight.shape == (1000, 32)


def test_demo_text_weights_file(tmp_path):
    torch.manual_seed(9)
    source = DemoText().eval()
    path = tmp_path / "text.pt"
    torch.save(source.state_dict(), path)
    assert torch.equal(load_model("demo:text", weights=str(path)).head.weight, source.head.weight)
    torch.save(DemoText(num_classes=3).state_dict(), path)
    with pytest.raises(ValueError, match=rf"the state_dict in {path} does not fit demo:text.*size mismatch for head.weight"):
        load_model("demo:text", weights=str(path))


def test_demo_site_budgets():
    vgg = enumerate_sites(load_model("demo:vgg"), (1, 28, 28))
    assert len(vgg) == 17 and sum(s.is_weight_site for s in vgg) == 8
    assert [s.module_type for s in vgg[1:5]] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert [s.name for s in vgg[-4:]] == ["classifier.0", "classifier.1", "classifier.2", "classifier.3"]


def test_demo_resnet_calls_one_relu_twice_per_block():
    sites = enumerate_sites(load_model("demo:resnet"), (1, 28, 28))
    calls = {}
    for site in sites:
        calls.setdefault(site.name, []).append(site.call)
    for block in ("layer1", "layer2", "layer3"):
        assert calls[f"{block}.relu"] == [0, 1]
    assert calls["layer2.downsample.0"] == [0] and calls["layer3.downsample.1"] == [0]
    assert "layer1.downsample.0" not in calls
    assert [s.is_weight_site for s in sites if s.name == "layer1.relu"] == [False, False]


def test_demo_weights_options_and_checksum(tmp_path, monkeypatch):
    shipped = load_model("demo:vgg")
    random = load_model("demo:vgg", weights="none")
    assert isinstance(random, DemoVGG) and not torch.equal(random.features[0].weight, shipped.features[0].weight)
    path = tmp_path / "w.pt"
    torch.save(random.state_dict(), path)
    assert torch.equal(load_model("demo:vgg", weights=str(path)).features[0].weight, random.features[0].weight)
    assert isinstance(load_model("demo:resnet", weights="none"), DemoResNet)
    with pytest.raises(ValueError, match="classifies Fashion-MNIST's 10 classes; got num_classes=5"):
        load_model("demo:vgg", num_classes=5)
    (tmp_path / "demo_vgg.pt").write_bytes(models.demo_weights_path("vgg").read_bytes() + b"\x00")
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"checksum mismatch for .*demo_vgg\.pt"):
        load_model("demo:vgg")
    with pytest.raises(ValueError, match=r"demo_resnet\.pt\) are missing"):
        load_model("demo:resnet")


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["foo:bar", "resnet20", "demo:", "demo:alexnet", "", None, "Demo:vgg", "torchvision:"])
def test_bad_names_list_the_valid_forms(name):
    for call in (load_model, check_model_name):
        with pytest.raises(ValueError) as info:
            call(name)
        message = str(info.value)
        assert all(f"demo:{n}" in message for n in ("vgg", "resnet", "vit", "text"))
        if name != "demo:alexnet":
            for form in ("chenyaofo:<cifar10|cifar100>_<arch>", "torchvision:<arch>", "file:<path>"):
                assert form in message


def test_valid_names_pass_the_cheap_check():
    for name in ("demo:vgg", "demo:resnet", "demo:vit", "demo:text", "chenyaofo:cifar10_resnet20", "chenyaofo:cifar100_repvgg_a2", "torchvision:resnet18"):
        check_model_name(name)
    assert set(models.MODEL_SOURCES) == {"chenyaofo", "torchvision", "file", "demo"}


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        load_model("torchvision:resnet18", num_classes=num_classes)


def test_default_dataset_for():
    assert default_dataset_for("demo:vgg") == "fashion-mnist"
    assert default_dataset_for("demo:resnet") == "fashion-mnist"
    assert default_dataset_for("demo:vit") == "fashion-mnist"
    assert default_dataset_for("demo:text") == "synthetic-tokens:32:1000:4"
    assert default_dataset_for("demo:alexnet") is None
    assert default_dataset_for("chenyaofo:cifar10_resnet20") == "cifar10"
    assert default_dataset_for("chenyaofo:cifar100_vgg19_bn") == "cifar100"
    assert default_dataset_for("torchvision:resnet18") is None
    assert default_dataset_for("file:/x.pt") is None
    assert default_dataset_for("nonsense") is None


def test_random_initialization_is_the_same_in_every_process():
    """Trials in different worker processes must see the same random-weight model."""
    import subprocess
    import sys

    code = "from trainables.zoo.models import load_model; import torch; print(float(load_model('demo:vgg', weights='none').features[0].weight.detach().sum()))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    torch.manual_seed(123)  # whatever this process's global RNG did before
    here = float(load_model("demo:vgg", weights="none").features[0].weight.detach().sum())
    assert float(other) == here
