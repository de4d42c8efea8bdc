"""Tiny deterministic models and data for engine tests (no downloads)."""
import torch
from torch import nn


class SharedReluNet(nn.Module):
    """Calls ``self.relu`` twice per forward, like the zoo's ResNet BasicBlock."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.conv2(out) + out)
        return self.fc(self.pool(out).flatten(1))


def plain_net() -> nn.Sequential:
    """A small VGG-like net without module reuse (PyTorchFI can run it)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 10),
    ).eval()


def shared_relu_net() -> SharedReluNet:
    torch.manual_seed(0)
    return SharedReluNet().eval()


def make_data(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 3x8x8 images whose labels are the plain net's own predictions for most images,
    so the clean model is right on a known majority (a realistic golden-correct set)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 8, 8, generator=g)
    with torch.no_grad():
        labels = plain_net()(images).argmax(1)
    wrong = torch.arange(n) % 5 == 0  # every 5th label wrong: golden-correct = 80%
    labels[wrong] = (labels[wrong] + 1) % 10
    return images, labels
