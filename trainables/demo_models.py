"""Small Fashion-MNIST classifiers shipped with trained weights, so that a campaign runs
with no network and in about a minute on a laptop CPU.

``DemoVGG`` mirrors torchvision's VGG layout (``features`` then ``classifier``);
``DemoResNet`` mirrors the chenyaofo zoo's CIFAR ResNet, including the ``relu`` module
that each residual block calls twice (the case the seed study's tool refused).
"""
from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


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


DEMO_ARCHS: dict[str, type[nn.Module]] = {"vgg": DemoVGG, "resnet": DemoResNet}
