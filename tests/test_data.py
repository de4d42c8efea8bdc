"""trainables.zoo.data: the shipped Fashion-MNIST test and calibration splits, CIFAR from
torchvision's file layout (fixtures built here, offline), synthetic images and tokens, and
argument checking."""
from __future__ import annotations

import gzip
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from trainables.zoo import data
from trainables.zoo.data import (
    DATASETS,
    Dataset,
    DatasetNotFoundError,
    check_dataset_name,
    load_dataset,
    parse_synthetic,
    parse_synthetic_tokens,
    read_idx_split,
    sha256_file,
)

FASHION_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
CALIB_SHA256 = {
    "calib-images-idx3-ubyte.gz": "f22187ccdaf60ba8ba633c688ffdb32f5d0268e239d82877be5684d1661de7f9",
    "calib-labels-idx1-ubyte.gz": "eebe183fe476d171b9496a702183a5bac1aa920264ba962d5208ac2c6487ee0f",
}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    return load_dataset("fashion-mnist")


# ---------------------------------------------------------------- Fashion-MNIST


def test_shipped_fashion_mnist_files_have_the_upstream_checksums():
    for name, digest in FASHION_SHA256.items():
        assert sha256_file(data.SHIPPED_DIR / name) == digest
    assert data.FASHION_MNIST_SHA256 == FASHION_SHA256
    assert (data.SHIPPED_DIR / "LICENSE").is_file()


def test_fashion_mnist_is_the_real_test_split(fashion):
    assert fashion.name == "fashion-mnist"
    assert fashion.images.shape == (10000, 1, 28, 28) and fashion.images.dtype == torch.float32
    assert fashion.labels.shape == (10000,) and fashion.labels.dtype == torch.int64
    assert fashion.input_shape == (1, 28, 28) and len(fashion) == 10000
    assert fashion.num_classes == 10 and fashion.synthetic is False
    assert fashion.labels.bincount().tolist() == [1000] * 10
    assert fashion.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    # image 0, row 14, column 14 is 110/255; background pixels are 0
    assert fashion.images[0, 0, 14, 14].item() == pytest.approx((110 / 255 - 0.2860) / 0.3530, abs=1e-6)
    assert fashion.images[0, 0, 14, 14].item() == pytest.approx(0.41182023, abs=1e-7)
    assert fashion.images[0, 0, 0, 0].item() == pytest.approx(-0.2860 / 0.3530, abs=1e-6)


def test_fashion_mnist_checksum_mismatch_and_missing_file(tmp_path, monkeypatch):
    for name in FASHION_SHA256:
        shutil.copy(data.SHIPPED_DIR / name, tmp_path / name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(labels.read_bytes())
    raw[100] ^= 0x01
    labels.write_bytes(bytes(raw))
    monkeypatch.setattr(data, "SHIPPED_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"checksum mismatch for .*t10k-labels-idx1-ubyte\.gz"):
        load_dataset("fashion-mnist")
    labels.unlink()
    with pytest.raises(DatasetNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz is missing"):
        load_dataset("fashion-mnist")


def test_calibration_split_is_the_first_2000_training_images():
    for name, digest in CALIB_SHA256.items():
        assert sha256_file(data.SHIPPED_DIR / name) == digest
    assert data.FASHION_MNIST_CALIB_SHA256 == CALIB_SHA256
    assert sum((data.SHIPPED_DIR / name).stat().st_size for name in CALIB_SHA256) < 2_000_000
    assert "calib-images-idx3-ubyte.gz" in (data.SHIPPED_DIR / "LICENSE").read_text()
    calib = load_dataset("fashion-mnist-calib")
    assert calib.images.shape == (2000, 1, 28, 28) and calib.images.dtype == torch.float32
    assert calib.input_shape == (1, 28, 28) and calib.num_classes == 10 and calib.synthetic is False
    # the training split's well-known start (ankle boot, T-shirt, T-shirt, dress, ...)
    assert calib.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert calib.labels[-5:].tolist() == [7, 1, 3, 5, 8]
    assert calib.labels.bincount().tolist() == [194, 216, 202, 195, 186, 200, 194, 215, 198, 200]
    # image 0, row 14, column 14 is 217/255, normalized like the test split
    assert calib.images[0, 0, 14, 14].item() == pytest.approx((217 / 255 - 0.2860) / 0.3530, abs=1e-6)
    assert len(load_dataset("fashion-mnist-calib", limit=100)) == 100


@pytest.mark.skipif(not os.path.isfile(f"{DEBIAN_FASHION_MNIST}/train-images-idx3-ubyte.gz"), reason="needs dataset-fashion-mnist")
def test_calibration_split_equals_the_upstream_training_prefix():
    images, labels = read_idx_split(DEBIAN_FASHION_MNIST, "train")
    calib_images, calib_labels = read_idx_split(data.SHIPPED_DIR, "calib")
    assert torch.equal(calib_images, images[:2000]) and torch.equal(calib_labels, labels[:2000])


def test_calibration_split_checksum_mismatch(tmp_path, monkeypatch):
    for name in CALIB_SHA256:
        shutil.copy(data.SHIPPED_DIR / name, tmp_path / name)
    images = tmp_path / "calib-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-1])
    monkeypatch.setattr(data, "SHIPPED_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"checksum mismatch for .*calib-images-idx3-ubyte\.gz"):
        load_dataset("fashion-mnist-calib")


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_split_parses_idx_files(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([7, 0, 3]))
    x, y = read_idx_split(tmp_path, "train")
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], torch.from_numpy(images.astype(np.uint8)))
    assert y.tolist() == [7, 0, 3] and y.dtype == torch.int64
    with pytest.raises(ValueError, match="unknown split 'test'"):
        read_idx_split(tmp_path, "test")
    with pytest.raises(DatasetNotFoundError, match=r"t10k-images-idx3-ubyte\.gz"):
        read_idx_split(tmp_path, "t10k")
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([7, 0]))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        read_idx_split(tmp_path, "train")
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"not an idx file")
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx_split(tmp_path, "train")


# ---------------------------------------------------------------- CIFAR


def _cifar_pixels(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    pixels[3, :, 5, 7] = (255, 0, 128)  # image 3, row 5, column 7: R, G, B
    return pixels


def write_cifar(root, name: str = "cifar10", n: int = 20) -> tuple[np.ndarray, list[int]]:
    """A tiny CIFAR test split in torchvision's layout (pickled dict, rows of 3072 bytes)."""
    spec = data.CIFAR_SPECS[name]
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    pixels = _cifar_pixels(n)
    labels = [(i * 7) % spec.num_classes for i in range(n)]
    entry = {"batch_label": "testing batch 1 of 1", spec.label_key: labels, "data": pixels.reshape(n, 3072), "filenames": [f"img{i}.png" for i in range(n)]}
    with open(folder / spec.test_file, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    meta = "batches.meta" if name == "cifar10" else "meta"
    with open(folder / meta, "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(spec.num_classes)]}, f)
    return pixels, labels


def test_cifar10_from_a_torchvision_layout_directory(tmp_path):
    pixels, labels = write_cifar(tmp_path, "cifar10")
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.images.shape == (20, 3, 32, 32) and ds.images.dtype == torch.float32
    assert ds.labels.tolist() == labels and ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    assert ds.images[3, :, 5, 7].tolist() == pytest.approx([2.514087988, -2.418254764, 0.275924300], abs=1e-6)
    assert ds.images[3, 0, 5, 7].item() == pytest.approx((1.0 - 0.4914) / 0.2023, abs=1e-6)
    expected = (torch.from_numpy(pixels).float() / 255 - torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2023, 0.1994, 0.2010]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(ds.images, expected, rtol=0, atol=1e-6)


def test_cifar100_uses_fine_labels_and_its_own_normalization(tmp_path):
    _, labels = write_cifar(tmp_path, "cifar100", n=12)
    ds = load_dataset("cifar100", root=str(tmp_path), limit=5)
    assert ds.num_classes == 100 and ds.labels.tolist() == labels[:5]
    assert ds.images[3, :, 5, 7].tolist() == pytest.approx(
        [(1 - 0.5070) / 0.2673, (0 - 0.4865) / 0.2564, (128 / 255 - 0.4409) / 0.2761], abs=1e-6
    )


def test_cifar_missing_files_say_what_to_pass(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", root=str(tmp_path))
    message = str(info.value)
    assert f"{tmp_path}/cifar-10-batches-py/test_batch" in message
    assert "download=True" in message and "--data-root" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-python/test\b"):
        load_dataset("cifar100", root=str(tmp_path))


def test_cifar_default_root_comes_from_the_environment(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10", n=4)
    monkeypatch.setenv("BITFLIP_DATA_ROOT", str(tmp_path))
    assert data.default_data_root() == str(tmp_path)
    assert load_dataset("cifar10").images.shape == (4, 3, 32, 32)
    monkeypatch.delenv("BITFLIP_DATA_ROOT")
    assert data.default_data_root() == os.path.expanduser("~/.cache/bitflip/data")


def test_cifar_download_goes_through_torchvision(tmp_path, monkeypatch):
    calls = []

    def fake_download(spec, root):
        calls.append((spec.torchvision_class, root))
        write_cifar(tmp_path, "cifar10", n=6)

    monkeypatch.setattr(data, "_torchvision_download", fake_download)
    assert len(load_dataset("cifar10", root=str(tmp_path), download=True)) == 6
    assert calls == [("CIFAR10", str(tmp_path))]
    load_dataset("cifar10", root=str(tmp_path), download=True)  # present: no second download
    assert len(calls) == 1


def test_cifar_batch_file_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(ValueError, match=r"test_batch is not a CIFAR-10 batch file.*refusing to unpickle global"):
        load_dataset("cifar10", root=str(tmp_path))
    assert not marker.exists()
    (folder / "test_batch").write_bytes(os.urandom(100))
    with pytest.raises(ValueError, match="is not a CIFAR-10 batch file"):
        load_dataset("cifar10", root=str(tmp_path))


# ---------------------------------------------------------------- synthetic


def test_synthetic_parsing():
    assert parse_synthetic("synthetic:3x32x32:10") == data.SyntheticSpec(3, 32, 32, 10, 10000)
    assert parse_synthetic("synthetic:1x28x20:7:512") == data.SyntheticSpec(1, 28, 20, 7, 512)
    for bad in ["synthetic:3x32:10", "synthetic:0x8x8:10", "synthetic:3x8x8:1", "synthetic:3x8x8:10:0",
                "synthetic:axbxc:10", "synthetic:3x8x8", "synthetic:3x8x8:10:5:5", "synthetic:-3x8x8:10"]:
        with pytest.raises(ValueError, match=r"bad synthetic data set"):
            check_dataset_name(bad)
    with pytest.raises(ValueError, match=r"use synthetic:<C>x<H>x<W>:<classes>\[:<N>\]"):
        check_dataset_name("synthetic:3x32:10")


def test_synthetic_is_deterministic_and_limit_keeps_a_prefix():
    a = load_dataset("synthetic:3x8x8:5:40")
    b = load_dataset("synthetic:3x8x8:5:40")
    assert a.synthetic is True and a.num_classes == 5 and a.input_shape == (3, 8, 8) and len(a) == 40
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.labels[:10].tolist() == [4, 1, 3, 1, 3, 1, 0, 3, 1, 0]
    assert a.images[0, 0, 0, 0].item() == pytest.approx(0.08297430723905563, abs=1e-7)
    assert int(a.labels.min()) >= 0 and int(a.labels.max()) <= 4
    first = load_dataset("synthetic:3x8x8:5:40", limit=7)
    assert torch.equal(first.images, a.images[:7]) and torch.equal(first.labels, a.labels[:7])
    bigger = load_dataset("synthetic:3x8x8:5:100")  # image i does not depend on N
    assert torch.equal(bigger.images[:40], a.images) and torch.equal(bigger.labels[:40], a.labels)


def test_synthetic_tokens_parsing_and_bad_names():
    assert parse_synthetic_tokens("synthetic-tokens:32:1000:4") == data.SyntheticTokensSpec(32, 1000, 4, 10000)
    assert parse_synthetic_tokens("synthetic-tokens:8:5:3:20") == data.SyntheticTokensSpec(8, 5, 3, 20)
    for bad in ["synthetic-tokens:32:1000", "synthetic-tokens:0:10:2", "synthetic-tokens:8:1:2", "synthetic-tokens:8:10:1",
                "synthetic-tokens:8:10:4:0", "synthetic-tokens:8x8:10:4", "synthetic-tokens:8:10:4:5:5", "synthetic-tokens:-8:10:4",
                "synthetic-tokens:", "synthetic-tokens:a:b:c"]:
        with pytest.raises(ValueError, match=r"^bad synthetic token data set") as info:
            check_dataset_name(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"use synthetic-tokens:<T>:<vocab>:<classes>\[:<N>\]"):
        load_dataset("synthetic-tokens:32:1000")


def test_synthetic_tokens_are_deterministic_int64_ids():
    a = load_dataset("synthetic-tokens:8:5:3:20")
    assert a.images.shape == (20, 8) and a.images.dtype == torch.int64 and a.input_shape == (8,)
    assert a.labels.shape == (20,) and a.labels.dtype == torch.int64 and a.num_classes == 3 and a.synthetic is True
    assert a.labels.tolist() == [2, 0, 1, 1, 2, 2, 2, 0, 1, 0, 0, 1, 0, 1, 2, 2, 0, 2, 1, 0]
    assert a.images[0].tolist() == [1, 2, 3, 0, 3, 4, 2, 4] and a.images[19].tolist() == [4, 4, 1, 0, 2, 1, 4, 2]
    assert int(a.images.min()) == 0 and int(a.images.max()) == 4
    b = load_dataset("synthetic-tokens:8:5:3:20")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    first = load_dataset("synthetic-tokens:8:5:3:20", limit=7)
    assert torch.equal(first.images, a.images[:7]) and torch.equal(first.labels, a.labels[:7])
    bigger = load_dataset("synthetic-tokens:8:5:3:50")  # example i does not depend on N
    assert torch.equal(bigger.images[:20], a.images) and torch.equal(bigger.labels[:20], a.labels)
    default = load_dataset("synthetic-tokens:32:1000:4", limit=2)
    assert default.labels.tolist() == [1, 2] and default.images[0, :8].tolist() == [551, 127, 953, 185, 998, 664, 297, 674]
    with pytest.raises(ValueError, match="limit 21 exceeds the 20 examples of synthetic-tokens:8:5:3:20"):
        load_dataset("synthetic-tokens:8:5:3:20", limit=21)


# ---------------------------------------------------------------- names and limits


def test_limit_keeps_the_first_images(fashion):
    small = load_dataset("fashion-mnist", limit=100)
    assert torch.equal(small.images, fashion.images[:100]) and torch.equal(small.labels, fashion.labels[:100])
    with pytest.raises(ValueError, match="limit 10001 exceeds the 10000 images of fashion-mnist"):
        load_dataset("fashion-mnist", limit=10001)
    with pytest.raises(ValueError, match="limit 41 exceeds the 40 images"):
        load_dataset("synthetic:3x8x8:5:40", limit=41)


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "10"])
def test_bad_limits_fail_before_loading(limit, monkeypatch):
    monkeypatch.setitem(DATASETS, "fashion-mnist", lambda root, download: pytest.fail("loaded data"))
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_dataset("fashion-mnist", limit=limit)


@pytest.mark.parametrize("name", ["mnist", "CIFAR10", "", "cifar-10", None, "synthetic"])
def test_unknown_names_list_the_valid_ones(name, monkeypatch):
    for key in list(DATASETS):
        monkeypatch.setitem(DATASETS, key, lambda root, download: pytest.fail("loaded data"))
    with pytest.raises(ValueError) as info:
        load_dataset(name)
    for valid in ("fashion-mnist", "fashion-mnist-calib", "cifar10", "cifar100", "synthetic:<C>x<H>x<W>:<classes>",
                  "synthetic-tokens:<T>:<vocab>:<classes>"):
        assert valid in str(info.value)


def test_check_dataset_name_accepts_the_valid_names():
    for name in ("fashion-mnist", "fashion-mnist-calib", "cifar10", "cifar100", "synthetic:3x32x32:10", "synthetic:1x28x28:10:64",
                 "synthetic-tokens:32:1000:4", "synthetic-tokens:16:100:4:256"):
        check_dataset_name(name)
