"""Builds the example model `seqpool`: a deterministic sequence encoder with a variable
length, to show (and test) batching of requests whose shapes differ past dimension 0.

Writes a TorchScript file to models/seqpool/1/model.pt. Run with `make models`.

    tokens  FP32 [-1, -1, 4]   a batch of sequences of 4 features, any length
    pooled  FP32 [-1, 8]       mean and max over the length of tanh(tokens @ W + b)

The weights come from a fixed seed (nothing is trained); a sequence of length 0 pools to
zeros. Requests of different lengths are batched apart: a batch never mixes lengths.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
FEATURES, HIDDEN = 4, 4


class SeqPool(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(FEATURES, HIDDEN)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(HIDDEN, FEATURES, generator=generator))
            self.proj.bias.copy_(torch.randn(HIDDEN, generator=generator) * 0.1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] == 0:
            return tokens.new_zeros((tokens.shape[0], 2 * self.proj.out_features))
        h = torch.tanh(self.proj(tokens))
        return torch.cat([h.mean(dim=1), h.amax(dim=1)], dim=1)


def build(seed: int = 0) -> torch.jit.ScriptModule:
    return torch.jit.script(SeqPool(seed).eval())


def main() -> None:
    out = HERE / "1" / "model.pt"
    out.parent.mkdir(exist_ok=True)
    torch.jit.save(build(), str(out))
    print(f"seqpool v1: {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
