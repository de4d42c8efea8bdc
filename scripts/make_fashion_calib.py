"""Write the shipped Fashion-MNIST calibration split: the first 2,000 images and labels of
the training split, as gzipped IDX files ``calib-{images-idx3,labels-idx1}-ubyte.gz``.

    python scripts/make_fashion_calib.py --data /usr/share/datasets/fashion-mnist --out data/fashion-mnist/

The gzip stream carries no file name and time 0, so with the same zlib the bytes (and the SHA-256s printed
for trainables.zoo.data.FASHION_MNIST_CALIB_SHA256) are the same on every run.
"""
from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from trainables.zoo.data import FASHION_MNIST_CALIB_IMAGES, read_idx_split, sha256_file  # noqa: E402


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (magic 0x0000 0x08 ndim, big-endian dims), gzipped reproducibly."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="directory with the Fashion-MNIST training IDX .gz files")
    parser.add_argument("--out", required=True, help="directory to write the calib-*.gz files to")
    parser.add_argument("--images", type=int, default=FASHION_MNIST_CALIB_IMAGES)
    args = parser.parse_args(argv)
    images, labels = read_idx_split(args.data, "train")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, array in (("calib-images-idx3-ubyte.gz", images[: args.images, 0].numpy()),
                        ("calib-labels-idx1-ubyte.gz", labels[: args.images].numpy())):
        write_idx(out / name, array)
        print(f"{out / name}: {(out / name).stat().st_size} bytes, sha256 {sha256_file(out / name)}")
    print(f"labels per class: {np.bincount(labels[: args.images].numpy(), minlength=10).tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
