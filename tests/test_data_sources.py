"""The data-set registry: folder:, tensors:, hf-dataset:, py:, --transform, the memory-mapped
image cache and one-line errors for bad input. Data are made in the test (offline)."""
import multiprocessing
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_image, encode_jpeg, write_png

from campaign.spec import CampaignSpec, SpecError, resolve
from trainables.inject import engine
from trainables.zoo import datasets as registry
from trainables.zoo.data import SHIPPED_DIR, load_dataset, read_idx_split
from trainables.zoo.datasets.images import MappedImages
from trainables.zoo.datasets.transforms import ImageTransform, parse_transform

# torchvision announces, per image, that TorchCodec supersedes its decoders (also in these tests' PNG writes)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

FASHION_TRANSFORM = "mean=0.2860,std=0.3530"  # the shipped split's normalization (trainables.zoo.data)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def fashion_folder(directory: Path, n: int) -> Path:
    """The first n shipped Fashion-MNIST test images as PNGs in class folders, named by index."""
    images, labels = read_idx_split(SHIPPED_DIR, "t10k")
    for i in range(n):
        (directory / str(int(labels[i]))).mkdir(parents=True, exist_ok=True)
        write_png(images[i], str(directory / str(int(labels[i])) / f"{i:05d}.png"))
    return directory


def colour_folder(directory: Path, sizes=((40, 52), (61, 45), (48, 48), (33, 70))) -> Path:
    """Random RGB images of different sizes, PNG and JPEG, in two classes."""
    g = torch.Generator().manual_seed(7)
    for i, (h, w) in enumerate(sizes):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        folder = directory / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        if i % 2:
            (folder / f"img{i}.jpg").write_bytes(encode_jpeg(image).numpy().tobytes())
        else:
            write_png(image, str(folder / f"img{i}.png"))
    return directory


@pytest.fixture(scope="module")
def fashion300(tmp_path_factory):
    return fashion_folder(tmp_path_factory.mktemp("fm"), 300)


def test_fashion_pngs_load_bit_identical_to_fashion_mnist_in_memory_and_mapped(fashion300, tmp_path):
    reference = load_dataset("fashion-mnist", limit=300)
    memory = load_dataset(f"folder:{fashion300}", transform=FASHION_TRANSFORM)
    mapped = load_dataset(f"folder:{fashion300}", transform=FASHION_TRANSFORM, cache=str(tmp_path / "cache"))
    assert isinstance(mapped.images, MappedImages) and memory.num_classes == 10
    assert torch.equal(bits(memory.images), bits(reference.images)) and torch.equal(memory.labels, reference.labels)
    assert torch.equal(bits(mapped.images[:]), bits(reference.images)) and torch.equal(mapped.labels, reference.labels)
    assert torch.equal(bits(mapped.images[17:141]), bits(reference.images[17:141]))
    # the digest a prepared cache records is the in-memory path's
    from trainables.digests import input_digests
    from trainables.zoo.models import load_model

    model = load_model("demo:vgg", num_classes=10)
    assert (input_digests("demo:vgg", None, None, None, mapped, model)["data_sha256"]
            == input_digests("demo:vgg", None, None, None, reference, model)["data_sha256"])
    # the engine runs on the mapped images and sees the same golden pass and faults
    a = engine.prepare(model, (reference.images, reference.labels), batch_size=64, device="cpu")
    b = engine.prepare(model, (mapped.images, mapped.labels), batch_size=64, device="cpu")
    assert torch.equal(a.golden, b.golden) and a.clean_accuracy == b.clean_accuracy
    site = a.site("neuron", 3)
    ra = engine.run_faults(a, site, "neuron", 30, 5, record="all")
    rb = engine.run_faults(b, b.site("neuron", 3), "neuron", 30, 5, record="all")
    assert np.array_equal(ra.counts.by_bit, rb.counts.by_bit) and ra.counts.mismatches > 0
    assert np.array_equal(ra.records.faulty, rb.records.faulty)


def test_folder_campaign_rows_equal_fashion_mnist_rows(fashion300, ray_address, tmp_path):
    """demo:vgg on folder: (through Ray, its workers mapping the cache) gives the rows the same
    trials give on fashion-mnist run directly."""
    import pandas as pd

    from campaign.runner import run_campaign
    from trainables.trial import CampaignSettings, TrialPoint, run_trial

    spec = CampaignSpec(model="demo:vgg", dataset=f"folder:{fashion300}", transform=FASHION_TRANSFORM,
                        data_cache=str(tmp_path / "cache"), layers="0,13", bits="30", record="all", images=200,
                        out=str(tmp_path / "runs"), name="folder")
    outcome = run_campaign(spec)
    assert outcome.complete and outcome.total == 3  # neuron 0, 13 and weight 13
    trials = pd.read_parquet(outcome.directory / "trials.parquet").sort_values("trial_key").reset_index(drop=True)
    faults = pd.read_parquet(outcome.directory / "faults")
    settings = CampaignSettings(name="direct", directory=str(tmp_path / "direct"), model="demo:vgg",
                                dataset="fashion-mnist", images=200, record="all")
    for _, row in trials.iterrows():
        direct = run_trial(settings, TrialPoint(row["kind"], int(row["site_index"]), 30, int(row["seed"])))
        for column in ("images", "golden_correct", "mismatches", "changed", "nonfinite", "sdc", "misclassification_rate"):
            assert direct[column] == row[column], (row["trial_key"], column)
    direct_faults = pd.read_parquet(tmp_path / "direct" / "faults")
    columns = [c for c in faults.columns if c != "campaign"]  # every per-fault column: positions, bits, values, outcomes
    assert {"position", "value_before", "faulty"} <= set(columns)
    assert len(faults) == 3 * 200
    pd.testing.assert_frame_equal(faults[columns].sort_values(["trial_key", "image"]).reset_index(drop=True),
                                  direct_faults[columns].sort_values(["trial_key", "image"]).reset_index(drop=True))


def test_torchvision_transform_equals_the_weights_own_transforms(tmp_path):
    import torchvision

    folder = colour_folder(tmp_path / "img")
    name = "ResNet18_Weights.IMAGENET1K_V1"
    preset = torchvision.models.get_weight(name).transforms()
    data = load_dataset(f"folder:{folder}", transform=f"torchvision:{name}")
    files = sorted(folder.rglob("img*"), key=lambda p: p.name)
    expected = torch.stack([preset(decode_image(str(f))) for f in files])
    assert data.images.shape == expected.shape and torch.equal(bits(data.images), bits(expected))
    assert data.labels.tolist() == [0 if f.parent.name == "a" else 1 for f in files]
    mapped = load_dataset(f"folder:{folder}", transform=f"torchvision:{name}", cache=str(tmp_path / "c"))
    assert torch.equal(bits(mapped.images[:]), bits(expected))


def test_explicit_timm_and_hf_transforms_resolve_to_their_configs(tmp_path):
    import timm
    from timm.data import resolve_data_config
    from transformers import ViTImageProcessor

    t = parse_transform("resize=36,crop=32x30,mean=0.5,0.25,0.125,std=0.5,0.5,0.25,interpolation=bicubic")
    assert t == ImageTransform((36,), (32, 30), (0.5, 0.25, 0.125), (0.5, 0.5, 0.25), "bicubic", 3)
    assert parse_transform("mean=0.3,std=0.2") == ImageTransform(None, None, (0.3,), (0.2,), "bilinear", 1)
    config = resolve_data_config(pretrained_cfg=timm.get_pretrained_cfg("resnet18").to_dict())
    t = parse_transform("timm", "timm:resnet18")
    assert t.resize == (int(config["input_size"][1] // config["crop_pct"]),) and t.crop == tuple(config["input_size"][1:])
    assert (t.mean, t.std, t.interpolation) == (tuple(config["mean"]), tuple(config["std"]), config["interpolation"])
    ViTImageProcessor(size={"height": 20, "width": 24}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6],
                      resample=3).save_pretrained(tmp_path / "vit")
    t = parse_transform("hf", f"hf:{tmp_path / 'vit'}")
    assert t == ImageTransform((20, 24), None, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bicubic", 3)
    data = load_dataset(f"folder:{colour_folder(tmp_path / 'img')}", transform="hf", model=f"hf:{tmp_path / 'vit'}")
    assert tuple(data.images.shape) == (4, 3, 20, 24)


def _load_mapped(args):
    """In a fresh process: load through the cache; (prepared now?, inode of the mapped file, digest)."""
    directory, cache = args
    from trainables.zoo.datasets.folder import decode, scan
    from trainables.zoo.datasets.images import ImageSource, mapped, sha256_files
    from trainables.zoo.datasets.transforms import parse_transform

    files, labels, _ = scan(directory)
    source = ImageSource(len(files), lambda i: decode(files[i], 1), lambda i: str(files[i]),
                         lambda: sha256_files(files, Path(directory)))
    images, sha256, prepared = mapped(source, parse_transform(FASHION_TRANSFORM), torch.tensor(labels), cache)
    return prepared, os.stat(images.path).st_ino, sha256


def test_cache_is_shared_by_two_workers_and_a_changed_source_or_transform_makes_a_new_one(tmp_path):
    folder = fashion_folder(tmp_path / "fm", 40)
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(_load_mapped, [(str(folder), str(cache))] * 2)
    assert sorted(r[0] for r in results) == [False, True]  # one prepared, the other waited and mapped it
    assert results[0][1:] == results[1][1:]  # the same file (inode) and digest
    assert len([p for p in cache.iterdir()]) == 1
    first = load_dataset(f"folder:{folder}", transform=FASHION_TRANSFORM, cache=str(cache))
    assert first.images.path.stat().st_ino == results[0][1]
    changed = next(folder.rglob("00007.png"))
    image = decode_image(str(changed))
    write_png(255 - image, str(changed))
    second = load_dataset(f"folder:{folder}", transform=FASHION_TRANSFORM, cache=str(cache))
    third = load_dataset(f"folder:{folder}", transform="mean=0.5,std=0.25", cache=str(cache))
    assert len(list(cache.iterdir())) == 3 and len({first.images.path, second.images.path, third.images.path}) == 3
    assert torch.equal(second.images.pixels(7, 8)[0], 255 - image) and torch.equal(second.images.pixels(0, 7), first.images.pixels(0, 7))
    assert torch.equal(bits(third.images[:]), bits((second.images.pixels(0, 40).float() / 255 - 0.5) / 0.25))
    assert not list(cache.glob(".*.lock")) and not list(cache.glob("*.tmp-*"))


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".safetensors"])
def test_tensors_round_trip(tmp_path, suffix):
    g = torch.Generator().manual_seed(3)
    inputs = torch.randn(12, 3, 8, 8, generator=g)
    labels = torch.randint(0, 5, (12,), generator=g)
    path = tmp_path / f"data{suffix}"
    if suffix == ".pt":
        torch.save((inputs, labels), path)
    elif suffix == ".npz":
        np.savez(path, x=inputs.numpy(), y=labels.numpy(), num_classes=np.int64(7))
    else:
        from safetensors.torch import save_file

        save_file({"pixels": inputs, "classes": labels}, str(path))
    columns = {"input_column": "pixels", "label_column": "classes"} if suffix == ".safetensors" else {}
    data = load_dataset(f"tensors:{path}", **columns)
    assert torch.equal(bits(data.images), bits(inputs)) and torch.equal(data.labels, labels)
    assert data.num_classes == (7 if suffix == ".npz" else int(labels.max()) + 1)
    head = load_dataset(f"tensors:{path}", limit=5, **columns)
    assert torch.equal(head.images, inputs[:5]) and torch.equal(head.labels, labels[:5])


def _tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "the", "cat", "sat", "on", "mat", "dog", "ran"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(directory)
    return directory


def test_hf_dataset_round_trip_text_images_and_splits(tmp_path):
    import datasets
    from transformers import AutoTokenizer

    texts = ["the cat sat on the mat", "the dog ran", "a cat", "dog"]
    text = datasets.Dataset.from_dict({"sentence": texts, "label": [0, 1, 1, 0]},
                                      features=datasets.Features({"sentence": datasets.Value("string"),
                                                                  "label": datasets.ClassLabel(names=["x", "y", "z"])}))
    datasets.DatasetDict({"train": text, "test": text.select([1, 2, 3])}).save_to_disk(tmp_path / "text")
    model_dir = _tokenizer(tmp_path / "model")
    data = load_dataset(f"hf-dataset:{tmp_path / 'text'}:train", model=f"hf:{model_dir}")
    expected = AutoTokenizer.from_pretrained(model_dir)(texts, padding="longest", return_tensors="pt")["input_ids"]
    assert torch.equal(data.images, expected) and data.labels.tolist() == [0, 1, 1, 0] and data.num_classes == 3
    test = load_dataset(f"hf-dataset:{tmp_path / 'text'}", transform=f"tokenizer={model_dir},max_length=8")
    assert test.images.shape == (3, 8) and test.labels.tolist() == [1, 1, 0]  # the test split by default
    # images: the same PNGs as a folder, same transform, same tensors
    folder = colour_folder(tmp_path / "img")
    files = sorted(folder.rglob("img*"), key=lambda p: p.name)
    images = datasets.Dataset.from_dict({"img": [str(f) for f in files], "cls": [0 if f.parent.name == "a" else 1 for f in files]},
                                        features=datasets.Features({"img": datasets.Image(), "cls": datasets.Value("int64")}))
    images.save_to_disk(tmp_path / "images")
    transform = "resize=24,crop=20,mean=0.4,0.5,0.6,std=0.2,0.3,0.25"
    got = load_dataset(f"hf-dataset:{tmp_path / 'images'}", input_column="img", label_column="cls", transform=transform)
    want = load_dataset(f"folder:{folder}", transform=transform)
    assert torch.equal(bits(got.images), bits(want.images)) and torch.equal(got.labels, want.labels)
    mapped = load_dataset(f"hf-dataset:{tmp_path / 'images'}", input_column="img", label_column="cls", transform=transform,
                          cache=str(tmp_path / "cache"))
    assert torch.equal(bits(mapped.images[:]), bits(want.images))


def test_py_loader_returns_a_dataset_or_a_pair(tmp_path, monkeypatch):
    (tmp_path / "userdata.py").write_text(textwrap.dedent("""
        import torch
        X = torch.arange(60, dtype=torch.float32).reshape(5, 3, 2, 2)
        Y = torch.tensor([0, 2, 1, 2, 0])
        class Items(torch.utils.data.Dataset):
            num_classes = 4
            def __len__(self): return 5
            def __getitem__(self, i): return X[i], int(Y[i])
        def items(): return Items()
        def pair(): return X, Y
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from userdata import X, Y

    a, b = load_dataset("py:userdata:items"), load_dataset("py:userdata:pair", limit=3)
    assert torch.equal(a.images, X) and torch.equal(a.labels, Y) and a.num_classes == 4
    assert torch.equal(b.images, X[:3]) and torch.equal(b.labels, Y[:3]) and b.num_classes == 3
    assert a.model_classes == 4 and b.model_classes is None  # no class count given: the model decides


def test_a_source_from_an_entry_point_joins_the_registry(tmp_path, monkeypatch):
    (tmp_path / "plugdata.py").write_text(textwrap.dedent("""
        import torch
        from trainables.zoo.data import Dataset
        from trainables.zoo.datasets import DataSource
        def _load(rest, options):
            n = int(rest)
            return Dataset(f"ones:{rest}", torch.ones(n, 1, 2, 2), torch.zeros(n, dtype=torch.int64), 2, synthetic=True)
        def _check(rest, options):
            if not rest.isdigit():
                raise ValueError(f"ones:{rest}: give a count")
        SOURCE = DataSource("ones", _check, _load, "ones:<N>")
    """))
    dist = tmp_path / "plugdata-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugdata\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[bitflip_campaigns.datasets]\nones = plugdata:SOURCE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "_SOURCES", {})
    data = load_dataset("ones:3")
    assert data.images.shape == (3, 1, 2, 2) and "ones:<N>" in registry.syntaxes()
    with pytest.raises(ValueError, match="ones:x: give a count"):
        load_dataset("ones:x")


# ---------------------------------------------------------------- bad input: one line, nothing created


def _refused(tmp_path, match, **changes):
    values = dict(model="demo:vgg", out=str(tmp_path / "runs"), name="bad")
    if changes["dataset"].startswith(("folder:", "hf-dataset:")):  # image sources: the cache must not appear either
        values["data_cache"] = str(tmp_path / "cache")
    with pytest.raises(SpecError, match=match) as info:
        resolve(CampaignSpec(**{**values, **changes}))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    return str(info.value)


def test_bad_input_is_one_line_and_creates_nothing(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    _refused(tmp_path, r"folder:.*empty: no images", dataset=f"folder:{empty}")
    folder = fashion_folder(tmp_path / "fm", 6)
    _refused(tmp_path, r"unknown transform 'sharpen'", dataset=f"folder:{folder}", transform="sharpen")
    _refused(tmp_path, r"unknown transform torchvision:NoSuch_Weights", dataset=f"folder:{folder}", transform="torchvision:NoSuch_Weights.X")
    corrupt = next(folder.rglob("00003.png"))
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _refused(tmp_path, rf"{corrupt}: cannot read the image", dataset=f"folder:{folder}", transform=FASHION_TRANSFORM)
    torch.save({"inputs": torch.zeros(4, 1, 28, 28), "labels": torch.tensor([0, 1, 10, 2]), "num_classes": 10},
               tmp_path / "t.pt")
    _refused(tmp_path, r"label 10 of example 2 is outside 0\.\.9", dataset=f"tensors:{tmp_path / 't.pt'}")
    torch.save({"inputs": torch.zeros(4, 1, 28, 28), "labels": torch.tensor([0, 1, 3, 12])}, tmp_path / "u.pt")
    _refused(tmp_path, r"labels: label 12 of example 3 of tensors:.*u\.pt is outside the model's 10 classes \(0\.\.9\)",
             dataset=f"tensors:{tmp_path / 'u.pt'}")
    import datasets

    datasets.Dataset.from_dict({"text": ["a"], "label": [0]}).save_to_disk(tmp_path / "hf")
    _refused(tmp_path, r"label column 'target' does not exist; columns: text, label", dataset=f"hf-dataset:{tmp_path / 'hf'}",
             label_column="target")
    (tmp_path / "brokenmod.py").write_text("import no_such_package_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    message = _refused(tmp_path, r"module brokenmod failed to import \(ModuleNotFoundError: No module named 'no_such_package_xyz'\)",
                       dataset="py:brokenmod:load")
    assert message.startswith("data set py:brokenmod:load")


def test_cli_flags_reach_the_spec_and_image_settings_are_refused_elsewhere(tmp_path):
    from campaign import cli

    args = cli.build_parser().parse_args(["run", "--dataset", "hf-dataset:d:test", "--transform", "resize=8,crop=8",
                                          "--input-column", "img", "--label-column", "cls", "--data-cache", "auto"])
    spec = cli.spec_from_args(args, env={})
    assert (spec.dataset, spec.transform, spec.input_column, spec.label_column, spec.data_cache) == (
        "hf-dataset:d:test", "resize=8,crop=8", "img", "cls", "auto")
    torch.save((torch.zeros(2, 4), torch.tensor([0, 1])), tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"^transform: apply to image sources .*not tensors:"):
        load_dataset(f"tensors:{tmp_path / 't.pt'}", transform="resize=8")
    with pytest.raises(ValueError, match=r"^transform: apply to folder:, tensors:, hf-dataset: and py: data sets, not fashion-mnist"):
        load_dataset("fashion-mnist", transform="resize=8")


def test_a_worker_keeps_no_pages_of_the_mapped_images_it_has_read(fashion300, tmp_path):
    """Reading slices (what the golden pass and trials do) leaves none of the file's pages in
    this process's resident set: the page cache keeps them, worker memory does not grow."""
    data = load_dataset(f"folder:{fashion300}", transform=FASHION_TRANSFORM, cache=str(tmp_path / "cache"))
    for lo in range(0, len(data), 64):
        data.images[lo:lo + 64]

    def resident_kib(path: Path) -> int:
        lines = Path("/proc/self/smaps").read_text().splitlines()
        starts = [i for i, line in enumerate(lines) if line.endswith(str(path))]
        assert len(starts) == 1  # one mapping of the cache file
        return next(int(line.split()[1]) for line in lines[starts[0] + 1:] if line.startswith("Rss:"))

    assert data.images.path.stat().st_size == 300 * 28 * 28
    assert resident_kib(data.images.path) == 0
    np.asarray(data.images._pixels[:]).sum()  # touching the mapping without the reader makes it resident
    assert resident_kib(data.images.path) > 0


def test_data_without_a_class_count_runs_on_the_models_own_classes(tmp_path):
    """Labels 0..5 of a 10-class model: the data names no class count, so demo:vgg keeps its
    10 classes (a count of 6 from the labels would be refused by the model)."""
    images, labels = read_idx_split(SHIPPED_DIR, "t10k")
    keep = (labels < 6).nonzero()[:, 0][:8]
    torch.save({"inputs": load_dataset("fashion-mnist").images[keep], "labels": labels[keep]}, tmp_path / "six.pt")
    plan = resolve(CampaignSpec(model="demo:vgg", dataset=f"tensors:{tmp_path / 'six.pt'}", layers="0", sites=("neuron",),
                                out=str(tmp_path / "runs")))
    assert plan.num_images == 8 and len(plan.trials) == 1
