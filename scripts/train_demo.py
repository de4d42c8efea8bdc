"""Train a demo model (demo:vgg, demo:resnet or demo:vit) on the Fashion-MNIST training
split and write its weights for trainables/zoo/weights/, deterministically on the CPU; or
demo:lm (``--model lm``, scripts/demo_lm_training.py: its own options) on the King James Bible.

    python scripts/train_demo.py --data /usr/share/datasets/fashion-mnist --model vgg --out trainables/zoo/weights/
    python scripts/train_demo.py --model lm --out data/demo-lm   # after scripts/install_corpora.sh

Prints the training split's pixel mean/std (the constants trainables.zoo.data normalizes
with), the test accuracy after every epoch, and the weights' SHA-256 for trainables.zoo.models.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from trainables.zoo.data import (  # noqa: E402
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    normalize_fashion_mnist,
    read_idx_split,
    sha256_file,
)
from trainables.zoo.demo_models import DEMO_ARCHS  # noqa: E402

# Per-model defaults of the flags that differ (the CNNs use the common ones). The transformer
# takes stronger weight decay and flips only: 2-px crops shift content across its 7-px
# patches and slowed it (78.0% vs 83.4% test accuracy after 3 of 12 epochs). It was
# trained on one thread of a busy shared machine.
AUGMENTS = ("crop-flip", "flip")  # random 2-px crop and horizontal flip, or the flip alone
COMMON_DEFAULTS: dict[str, float | str] = {"epochs": 12, "lr": 3e-3, "weight_decay": 1e-4, "threads": 2, "augment": "crop-flip"}
MODEL_DEFAULTS: dict[str, dict[str, float | str]] = {"vit": {"lr": 2e-3, "weight_decay": 0.05, "threads": 1, "augment": "flip"}}
TRAINABLE = ("vgg", "resnet", "vit")  # the demo models trained on Fashion-MNIST (demo:text is random)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2, crop: bool = True) -> torch.Tensor:
    """Random crop with ``pad`` pixels of zero padding (in normalized units: the background)
    unless ``crop`` is False, and random horizontal flip, per image, drawn from ``generator``."""
    n, _, h, w = images.shape
    crops = images
    if crop:
        background = -FASHION_MNIST_MEAN / FASHION_MNIST_STD
        padded = F.pad(images, (pad, pad, pad, pad), value=background)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, :]
        crops = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


@torch.inference_mode()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum()) for i in range(0, len(images), batch_size))
    return correct / len(images)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--model=lm" in argv or any(a == "--model" and b == "lm" for a, b in zip(argv, argv[1:])):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from demo_lm_training import main as train_lm

        return train_lm(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="directory with the Fashion-MNIST IDX .gz files (train and t10k)")
    parser.add_argument("--model", required=True, choices=TRAINABLE)
    parser.add_argument("--out", required=True, help="directory to write demo_<model>.pt to")
    parser.add_argument("--epochs", type=int, help="default 12")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule (AdamW); default 3e-3 (vit: 2e-3)")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay; default 1e-4 (vit: 0.05)")
    parser.add_argument("--augment", choices=AUGMENTS, help="default crop-flip (vit: flip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads; default 2 (vit: 1). Results depend on it")
    args = parser.parse_args(argv)
    for key, value in {**COMMON_DEFAULTS, **MODEL_DEFAULTS.get(args.model, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    print(f"demo:{args.model}: {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, weight decay {args.weight_decay}, augment {args.augment}, seed {args.seed}, {args.threads} threads")

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)

    train_u8, train_labels = read_idx_split(args.data, "train")
    test_u8, test_labels = read_idx_split(args.data, "t10k")
    pixels = train_u8.double() / 255.0
    mean, std = float(pixels.mean()), float(pixels.std(unbiased=False))
    print(f"training split: {len(train_u8)} images, pixel mean {mean:.5f} std {std:.5f} "
          f"(trainables.zoo.data uses {FASHION_MNIST_MEAN:.4f} / {FASHION_MNIST_STD:.4f})")
    if round(mean, 4) != FASHION_MNIST_MEAN or round(std, 4) != FASHION_MNIST_STD:
        print("warning: these differ from the constants in trainables/zoo/data.py", file=sys.stderr)
    train_x, test_x = normalize_fashion_mnist(train_u8), normalize_fashion_mnist(test_u8)

    model = DEMO_ARCHS[args.model]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = (len(train_x) + args.batch_size - 1) // args.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps)
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total_loss = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            loss = F.cross_entropy(model(augment(train_x[idx], generator, crop=args.augment == "crop-flip")), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += float(loss.detach()) * len(idx)
        acc = accuracy(model, test_x, test_labels)
        print(f"epoch {epoch}/{args.epochs}: train loss {total_loss / len(train_x):.4f}, "
              f"test accuracy {acc:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)

    model.eval()
    os.makedirs(args.out, exist_ok=True)
    out = Path(args.out) / f"demo_{args.model}.pt"
    torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, out)
    print(f"final test accuracy {accuracy(model, test_x, test_labels):.4f}")
    print(f"wrote {out} ({out.stat().st_size} bytes) sha256 {sha256_file(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
