"""Writes the digits versions in every format the worker serves, from the shipped weights
(models/digits/<version>/model.pt), each as a model of the repository at --out:

    digits_export  torch_export   <v>/model.pt2  torch.export.save, dynamic batch dimension
    digits_aoti    aot_inductor   <v>/model.pt2  aoti_compile_and_package for --device
                                                 (native code for this machine: not shipped)
    digits_mlp     mlp_checkpoint <v>/model.pth  the weights (the /16 input scaling folded
                                                 into the first layer)
    digits_ts      torchscript    <v>/model.pt   a copy of the shipped file

    python models/digits/export.py                        # digits_export into models/
    python models/digits/export.py --out /tmp/m --formats all --device cpu

Every model's config is models/digits/config.json with its name and format changed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train import DigitsMLP  # noqa: E402

MODELS = {  # format -> (model name, file name)
    "torch_export": ("digits_export", "model.pt2"),
    "aot_inductor": ("digits_aoti", "model.pt2"),
    "mlp_checkpoint": ("digits_mlp", "model.pth"),
    "torchscript": ("digits_ts", "model.pt"),
}
MAX_BATCH = 1024  # upper bound of the exported dynamic batch dimension


def shipped_versions() -> list[str]:
    return sorted((p.name for p in HERE.iterdir()
                   if p.name.isdigit() and (p / "model.pt").is_file()), key=int)


def eager(version: str) -> DigitsMLP:
    """The shipped TorchScript weights in the eager module they were trained as."""
    state = torch.jit.load(str(HERE / version / "model.pt"), map_location="cpu").state_dict()
    model = DigitsMLP(state["net.0.weight"].shape[0])
    model.load_state_dict(state)
    return model.eval()


def export(model: DigitsMLP, device: str = "cpu") -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = (torch.zeros(2, 64, device=device),)
    with torch.no_grad():
        return torch.export.export(model.to(device), example, dynamic_shapes=({0: batch},))


def write(fmt: str, version: str, out: Path, device: str = "cpu") -> Path:
    """Writes one version of one format under `out`; returns the file written."""
    name, filename = MODELS[fmt]
    path = out / name / version / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    model = eager(version)
    if fmt == "torch_export":
        torch.export.save(export(model), str(path))
    elif fmt == "aot_inductor":
        from torch._inductor import aoti_compile_and_package

        aoti_compile_and_package(export(model, device), package_path=str(path))
    elif fmt == "mlp_checkpoint":
        linear1, linear2 = model.net[0], model.net[3]
        state = {"0.weight": linear1.weight / 16.0, "0.bias": linear1.bias,
                 "3.weight": linear2.weight, "3.bias": linear2.bias}
        torch.save({"input_size": 64, "hidden_size": linear1.out_features, "num_classes": 10,
                    "state_dict": {k: v.detach().clone() for k, v in state.items()}}, path)
    else:
        shutil.copyfile(HERE / version / "model.pt", path)
    return path


def write_config(fmt: str, out: Path, **changes) -> Path:
    name, filename = MODELS[fmt]
    config = json.loads((HERE / "config.json").read_text())
    config.update(name=name, format=fmt, **changes)
    path = out / name / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE.parent, help="model repository to write")
    p.add_argument("--formats", default="torch_export",
                   help=f"comma-separated among {', '.join(MODELS)}, or all")
    p.add_argument("--device", default="cpu", help="device aot_inductor compiles for")
    args = p.parse_args(argv)
    formats = list(MODELS) if args.formats == "all" else args.formats.split(",")
    unknown = [f for f in formats if f not in MODELS]
    if unknown:
        p.error(f"unknown format(s) {unknown}: choose among {', '.join(MODELS)}")
    for fmt in formats:
        write_config(fmt, args.out)
        for version in shipped_versions():
            path = write(fmt, version, args.out, args.device)
            print(f"{fmt}: {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
