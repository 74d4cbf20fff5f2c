"""Trains the example model `digits` on scikit-learn's bundled 8x8 digits (no download).

Writes TorchScript files to models/digits/<version>/model.pt and the held-out accuracy of
each version to models/digits/SCORES.json. Run with `make models`.

    input  FP32 [-1, 64]   pixel intensities 0..16, row-major
    logits FP32 [-1, 10]   (probabilities and predictions come from the classifier config)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
VERSIONS = {1: {"hidden": 64, "seed": 1}, 2: {"hidden": 128, "seed": 2}}


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 16.0)


def split():
    x, y = load_digits(return_X_y=True)
    return train_test_split(
        x.astype("float32"), y.astype("int64"), test_size=0.25, random_state=0, stratify=y
    )


def train(hidden: int, seed: int) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    x_train, x_test, y_train, y_test = split()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    model = DigitsMLP(hidden)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _epoch in range(60):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test)).argmax(1).numpy()
    return model, float((pred == y_test).mean())


def main() -> None:
    scores = {}
    for version, params in VERSIONS.items():
        model, accuracy = train(**params)
        out = HERE / str(version) / "model.pt"
        out.parent.mkdir(exist_ok=True)
        torch.jit.save(torch.jit.script(model), str(out))
        scores[str(version)] = {"held_out_accuracy": round(accuracy, 4), **params}
        print(f"digits v{version}: hidden={params['hidden']} held-out accuracy={accuracy:.4f}")
    (HERE / "SCORES.json").write_text(json.dumps(scores, indent=2) + "\n")


if __name__ == "__main__":
    main()
