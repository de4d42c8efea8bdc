"""Small Fashion-MNIST classifiers shipped with trained weights, so that a campaign runs
with no network and in about a minute on a laptop CPU, and a tiny token classifier.

``DemoVGG`` mirrors torchvision's VGG layout (``features`` then ``classifier``);
``DemoResNet`` mirrors the chenyaofo zoo's CIFAR ResNet, including the ``relu`` module
that each residual block calls twice (the case the seed study's tool refused);
``DemoViT`` mirrors torchvision's VisionTransformer (nn.MultiheadAttention, LayerNorm,
GELU, a class token and position embedding as parameters). ``DemoText`` (random weights,
int64 token input) exists for tests of non-image inputs.
"""
from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
TEXT_VOCAB = 1000  # demo:text's embedding rows: token ids must be < 1000
TEXT_CLASSES = 4


class DemoVGG(nn.Module):
    """Three Conv-BN-ReLU-MaxPool blocks (16-32-64 channels) and a two-layer classifier."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = (16, 32, 64), hidden: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = INPUT_SHAPE[0]
        for width in widths:
            layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            in_channels = width
        self.features = nn.Sequential(*layers)
        side = INPUT_SHAPE[1] // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last after every layer: CPU max-pooling is several times faster in it, and
        # a tensor an injection hook returns in NCHW is converted back. Values, and the
        # logical (C, H, W) order that sites index, do not depend on the memory format.
        for layer in self.features:
            x = layer(x).contiguous(memory_format=torch.channels_last)
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """The zoo's residual block: one ``relu`` module called after ``bn1`` and after the add."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class DemoResNet(nn.Module):
    """A stem conv, one residual block per stage (16-32-64 channels, stride 2 from the
    second stage, each with a downsample path), global average pooling and a Linear."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(INPUT_SHAPE[0], widths[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        blocks = []
        in_channels = widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(in_channels, width, stride=1 if i == 0 else 2))
            in_channels = width
        self.layer1, self.layer2, self.layer3 = blocks
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MLPBlock(nn.Sequential):
    """The transformer's feed-forward part: Linear, GELU, Linear (torchvision's names 0, 1, 2)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block, as torchvision's ViT ``EncoderBlock`` without dropout:
    ``x + attention(ln_1(x))``, then ``+ mlp(ln_2(.))``. ``self_attention`` is an
    ``nn.MultiheadAttention`` (batch_first) whose call returns a tuple (output, None)."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """Position embedding (a parameter added to the tokens), the blocks, a final LayerNorm."""

    def __init__(self, tokens: int, dim: int, depth: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, tokens, dim).normal_(std=0.02))
        self.layers = nn.Sequential()
        for i in range(depth):
            self.layers.add_module(f"encoder_layer_{i}", EncoderBlock(dim, heads, hidden))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class DemoViT(nn.Module):
    """A small vision transformer with torchvision's ``VisionTransformer`` layout and names
    (``conv_proj``, ``class_token``, ``encoder.pos_embedding``,
    ``encoder.layers.encoder_layer_<i>.self_attention``, ``heads.head``): 16 patches of
    7x7 pixels embedded by a Conv2d, a class token, pre-norm blocks and a Linear head on
    the class token. The class token and position embedding are parameters that no
    module owns as a ``weight``: targets for param sites only."""

    def __init__(self, num_classes: int = NUM_CLASSES, patch: int = 7, dim: int = 64, depth: int = 4, heads: int = 4, hidden: int = 128) -> None:
        super().__init__()
        side = INPUT_SHAPE[1] // patch
        self.conv_proj = nn.Conv2d(INPUT_SHAPE[0], dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = Encoder(side * side + 1, dim, depth, heads, hidden)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


class DemoText(nn.Module):
    """A tiny token classifier for tests of integer inputs, random weights only: an
    ``nn.Embedding`` of ``vocab`` ids, one ``EncoderBlock`` (nn.MultiheadAttention), a
    LayerNorm, the mean over tokens and a Linear. Takes (N, T) int64 ids of any length T."""

    def __init__(self, num_classes: int = TEXT_CLASSES, vocab: int = TEXT_VOCAB, dim: int = 32, heads: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.block = EncoderBlock(dim, heads, hidden)
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.block(self.embedding(tokens))).mean(dim=1))


DEMO_ARCHS: dict[str, type[nn.Module]] = {"vgg": DemoVGG, "resnet": DemoResNet, "vit": DemoViT, "text": DemoText}
DEMO_DATASETS: dict[str, str] = {
    "vgg": "fashion-mnist",
    "resnet": "fashion-mnist",
    "vit": "fashion-mnist",
    "text": f"synthetic-tokens:32:{TEXT_VOCAB}:{TEXT_CLASSES}",
    "lm": "text:demo-lm-heldout",
}
"""The data set each demo model is for: the Fashion-MNIST models are trained on its
training split (scripts/train_demo.py); demo:text has random weights and synthetic tokens;
demo:lm (a causal LM in data/demo-lm, trainables.zoo.models) the held-out verses shipped with it."""
