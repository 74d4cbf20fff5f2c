"""The .pt2 formats: torch.export programs and AOTInductor packages. Imports neither grpc
nor protobuf.

What each load trusts:
- torch_export: nothing executable. torch.export.load falls back to full unpickling for
  tensor-subclass weights, custom or opaque constants, sample inputs that weights_only
  refuses, and the pre-2.8 archive layout; `check_export_archive` refuses every one of
  those before torch reads the archive, from the same bytes torch then reads. What is
  left is JSON (the graph, calling only registered torch operators) and raw tensor bytes.
- aot_inductor: everything. The package holds a compiled shared library that is loaded
  into the worker (native code): serve only packages you built or trust like code.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from meshserve.common.datatypes import datatype
from meshserve.common.errors import FailedPrecondition, InvalidInput
from meshserve.common.repository import ModelConfig
from meshserve.model_worker.cuda_graphs import InputSpec, zero_inputs

log = logging.getLogger(__name__)

AOTI_DIR = "data/aotinductor/"
# Safe-to-read prefixes of payload files in torch's pt2 archive layout.
_TENSOR_CONSTANT = "tensor_"


def _entries(archive: zipfile.ZipFile) -> dict[str, str]:
    """Archive entries keyed by their path under the archive's root folder."""
    names = [n for n in archive.namelist() if not n.endswith("/")]
    roots = {PurePosixPath(n).parts[0] for n in names if "/" in n}
    if len(roots) != 1 or any("/" not in n for n in names):
        return {n: n for n in names}
    root = roots.pop()
    return {n[len(root) + 1:]: n for n in names}


def _open_archive(data: bytes, path: Path) -> tuple[zipfile.ZipFile, dict[str, str]]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InvalidInput(f"{path}: not a .pt2 archive (not a zip file)") from None
    entries = _entries(archive)
    if "archive_version" not in entries:
        if "data.pkl" in entries or any(k.startswith("code/") for k in entries):
            why = "it is a TorchScript file (format torchscript)"
        elif "serialized_exported_program.json" in entries:
            why = ("it is a torch.export file in the pre-2.8 layout, which torch unpickles: "
                   "export it again with this torch")
        else:
            why = "no archive_version entry"
        raise InvalidInput(f"{path}: not a .pt2 archive of torch.export.save or "
                           f"aoti_compile_and_package: {why}")
    return archive, entries


def check_export_archive(data: bytes, path: Path) -> None:
    """Refuses a torch.export archive whose loading would unpickle anything."""
    archive, entries = _open_archive(data, path)
    with archive:
        if any(k.startswith(AOTI_DIR) for k in entries):
            raise InvalidInput(f"{path}: is an AOTInductor package (format aot_inductor), "
                               "not a torch.export program")
        models = [k for k in entries if k.startswith("models/") and k.endswith(".json")]
        if models != ["models/model.json"]:
            raise InvalidInput(f"{path}: expected one exported program 'model' "
                               f"(torch.export.save), found {sorted(models) or 'none'}")

        def refuse(what: str):
            raise InvalidInput(f"{path}: {what} would be unpickled when loading; refused "
                               "(only plain tensors and the JSON graph are accepted)")

        for key in entries:
            if key.startswith(("data/weights/", "data/constants/")) and key.endswith(".pt"):
                refuse(f"'{key}' (pre-2.8 pickled weights)")
            if not key.endswith(("_weights_config.json", "_constants_config.json")):
                continue
            try:
                config = json.loads(archive.read(entries[key]))["config"]
                items = list(config.items())
            except (ValueError, KeyError, TypeError, AttributeError):
                raise InvalidInput(f"{path}: '{key}' is not a payload config") from None
            for fqn, meta in items:
                if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
                    refuse(f"'{fqn}' in {key}")
                if key.endswith("_constants_config.json") and not str(
                        meta.get("path_name", "")).startswith(_TENSOR_CONSTANT):
                    refuse(f"constant '{fqn}' (a custom or opaque object)")
        sample = entries.get("data/sample_inputs/model.pt")
        if sample is not None:
            try:
                torch.load(io.BytesIO(archive.read(sample)), weights_only=True)
            except Exception:  # noqa: BLE001 - anything weights_only refuses
                refuse("its sample inputs (not plain tensors)")


def read_torch_export(path: Path, device: torch.device, config: ModelConfig) -> nn.Module:
    """An ExportedProgram (torch.export.save) as a module on `device`.

    The module checks its inputs against the exported shapes in Python hooks, most of the
    cost of a small model's call. They run here, on the smallest and largest batch the
    config allows, and are then removed: every served batch has been validated against
    the config already."""
    data = path.read_bytes()
    check_export_archive(data, path)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - any unreadable archive is the caller's input
        raise InvalidInput(f"{path}: not a loadable torch.export program: {e}") from None
    if program.graph_signature.user_inputs_to_mutate or program.graph_signature.buffers_to_mutate:
        raise InvalidInput(f"{path}: the exported program mutates its inputs or buffers; "
                           "a served model must be a pure function of its inputs")
    if device.type != "cpu" or _devices(program) - {"cpu"}:
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    module = program.module(check_guards=False)
    specs = [InputSpec(s.name, datatype(s.datatype).torch, s.dims) for s in config.inputs]
    for rows in sorted({1, max(config.max_batch_size, 1)}):
        inputs = zero_inputs(specs, rows, device)
        if config.max_batch_size == 0:
            inputs = [x[0] for x in inputs]
        try:
            with torch.inference_mode():
                module(*inputs)
        except Exception as e:  # noqa: BLE001 - the program's own input checks
            shapes = ", ".join(f"{s.name} {s.datatype} {list(x.shape)}"
                               for s, x in zip(config.inputs, inputs, strict=True))
            raise InvalidInput(f"{path}: the exported program refuses inputs the config "
                               f"declares ({shapes}): {str(e)[:1000]}") from None
    module._forward_pre_hooks.clear()
    module._forward_hooks.clear()
    return module


def _devices(program) -> set[str]:
    return {t.device.type for t in (*program.state_dict.values(), *program.constants.values())
            if isinstance(t, torch.Tensor)}


class AOTIModule:
    """An AOTInductor package's runner with the module interface the worker uses."""

    def __init__(self, runner: Callable, byte_size: int):
        self.runner = runner
        self.byte_size = byte_size

    def __call__(self, *inputs: torch.Tensor):
        return self.runner(*inputs)

    def eval(self) -> AOTIModule:
        return self


def package_device(path: Path) -> tuple[str, dict]:
    """(device kind the package was compiled for, its metadata)."""
    archive, entries = _open_archive(path.read_bytes(), path)
    with archive:
        names = {PurePosixPath(k[len(AOTI_DIR):]).parts[0] for k in entries
                 if k.startswith(AOTI_DIR)}
    if not names:
        why = ("it is a torch.export program (format torch_export)"
               if "models/model.json" in entries else "no data/aotinductor/ in it")
        raise InvalidInput(f"{path}: not an AOTInductor package: {why}")
    if names != {"model"}:
        raise InvalidInput(f"{path}: expected one AOTInductor model 'model', found "
                           f"{sorted(names)}")
    try:
        meta = dict(torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(
            str(path), "model"))
    except Exception as e:  # noqa: BLE001
        raise InvalidInput(f"{path}: unreadable AOTInductor package metadata: {e}") from None
    return str(meta.get("AOTI_DEVICE_KEY", "")), meta


def read_aot_inductor(path: Path, device: torch.device) -> AOTIModule:
    """An AOTInductor package compiled for `device`'s kind (loads native code)."""
    kind, meta = package_device(path)
    if kind != device.type:
        raise FailedPrecondition(
            f"{path}: AOTInductor package compiled for {kind or 'an unknown device'}, this "
            f"worker runs on {device.type}: compile it for {device.type} "
            f"(aoti_compile_and_package on a {device.type} model and inputs)"
        )
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        built = str(meta.get("AOTI_COMPUTE_CAPABILITY", ""))
        if built and built != f"{major}{minor}":
            raise FailedPrecondition(f"{path}: AOTInductor package compiled for compute "
                                     f"capability {built}, {device} is {major}{minor}")
    try:
        from torch._inductor import aoti_load_package

        runner = aoti_load_package(str(path), device_index=device.index
                                   if device.index is not None else -1)
    except Exception as e:  # noqa: BLE001
        raise InvalidInput(f"{path}: not a loadable AOTInductor package: {e}") from None
    return AOTIModule(runner, path.stat().st_size)
