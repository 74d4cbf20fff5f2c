"""Fixtures of the model worker's tests: small real models written to tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from worker_models import mlp_config, save_mlp, write_config


@pytest.fixture
def tiny_repo(tmp_path) -> Path:
    """A repository with `tiny` (mlp_checkpoint, versions 1 and 2, classifier with top-2)
    and a copy of `digits`."""
    root = tmp_path / "models"
    folder = write_config(root, "tiny", mlp_config(
        outputs=[
            {"name": "logits", "datatype": "FP32", "dims": [3]},
            {"name": "probs", "datatype": "FP32", "dims": [3]},
            {"name": "label", "datatype": "INT64", "dims": []},
            {"name": "top_idx", "datatype": "INT64", "dims": [2]},
            {"name": "top_p", "datatype": "FP32", "dims": [2]},
        ],
        classifier={"logits": "logits", "probabilities": "probs", "predictions": "label",
                    "top_k": 2, "top_k_indices": "top_idx", "top_k_probabilities": "top_p"},
        version_policy={"all": True},
    ))
    save_mlp(folder / "1" / "model.pth", seed=1)
    save_mlp(folder / "2" / "model.pth", seed=2)
    shutil.copytree(Path(__file__).resolve().parents[2] / "models" / "digits", root / "digits")
    return root
