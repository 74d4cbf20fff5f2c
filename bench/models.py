"""Models the benchmarks build (random weights, seeded; nothing downloaded), and the
benchmark's own model repository: digits from models/, plus a compute-bound CNN."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
CNN_INPUT = (3, 64, 64)


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class TinyResNet(nn.Module):
    """A ResNet-style CNN: several ms per image batch on one CPU core."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(32), nn.ReLU())
        self.stage1 = nn.Sequential(Block(32), Block(32))
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU())
        self.stage2 = nn.Sequential(Block(64), Block(64))
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


CNN_CONFIG = {
    "name": "cnn",
    "format": "torchscript",
    "max_batch_size": 32,
    "inputs": [{"name": "input", "datatype": "FP32", "dims": list(CNN_INPUT)}],
    "outputs": [{"name": "logits", "datatype": "FP32", "dims": [10]}],
    "batching": {"preferred_batch_sizes": [8, 16], "max_queue_delay_us": 2000,
                 "max_queue_size": 4096},
    "cache": {"enabled": False},
}


def build_repository(target: Path) -> Path:
    """digits (copied from models/) and cnn (random weights, seed 0) under target."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "models" / "digits", target / "digits", dirs_exist_ok=True)
    cnn_dir = target / "cnn"
    (cnn_dir / "1").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = TinyResNet().eval()
    torch.jit.save(torch.jit.script(model), str(cnn_dir / "1" / "model.pt"))
    (cnn_dir / "config.json").write_text(json.dumps(CNN_CONFIG, indent=2))
    return target
