"""Helpers writing small real models to a folder (imported by the worker tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def write_config(root: Path, name: str, config: dict) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"name": name, **config}))
    return folder


def mlp_config(n_in: int = 4, classes: int = 3, max_batch: int = 8, **extra) -> dict:
    return {
        "format": "mlp_checkpoint",
        "max_batch_size": max_batch,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [n_in]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "dims": [classes]}],
        **extra,
    }


def save_mlp(path: Path, n_in: int = 4, hidden: int = 5, classes: int = 3, seed: int = 0,
             layout: str = "state_dict") -> nn.Sequential:
    """A template-style checkpoint; returns the reference network (eval mode)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(), nn.Linear(hidden, classes)
    )
    net.eval()
    state = net.state_dict()  # keys 0.weight, 0.bias, 3.weight, 3.bias
    sizes = {"input_size": n_in, "hidden_size": hidden, "num_classes": classes}
    if layout == "state_dict":
        data = {**sizes, "state_dict": {f"fc{i}.{k.split('.')[1]}": v for i, (k, v)
                                        in enumerate(state.items(), start=2)}}
    elif layout == "model_state_dict":
        data = {**sizes, "model_state_dict": {f"net.{k}": v for k, v in state.items()},
                "epoch": 3}
    else:  # the dict itself is the state dict
        data = {**sizes, **{f"layers.{k}": v for k, v in state.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return net


def run_async(test):
    """Runs an async test function in a fresh event loop (no pytest-asyncio here)."""
    import asyncio
    import functools

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(test(*args, **kwargs), 120))

    return wrapper
