"""Reads a model file into a torch module on a device, and maps what the network
returns onto the config's model outputs. Imports neither grpc nor protobuf."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from meshserve.common.errors import InvalidInput
from meshserve.common.repository import ModelConfig
from meshserve.model_worker.formats import AOTIModule, read_aot_inductor, read_torch_export

log = logging.getLogger(__name__)

Forward = Callable[..., tuple[torch.Tensor, ...]]


def load_network(config: ModelConfig, path: Path, device: torch.device) -> nn.Module:
    """The network of `config.format` from `path`, on `device`, in eval mode
    (an AOTIModule for aot_inductor: a compiled package, no nn.Module)."""
    if config.format == "torchscript":
        try:
            module = torch.jit.load(str(path), map_location=device)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the caller's input
            raise InvalidInput(f"{path}: not a loadable TorchScript file: {e}") from None
    elif config.format == "mlp_checkpoint":
        module = build_mlp(read_checkpoint(path), path).to(device)
    elif config.format == "torch_export":
        return read_torch_export(path, device, config)  # exported in eval mode, no eval() to call
    elif config.format == "aot_inductor":
        return read_aot_inductor(path, device)
    else:  # parse_config already refuses other formats
        raise InvalidInput(f"{path}: unsupported model format {config.format!r}")
    return module.eval()


def read_checkpoint(path: Path) -> Mapping:
    """torch.load with weights_only=True: tensors and plain containers, never pickled code."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - refused or corrupt file
        raise InvalidInput(f"{path}: not a weights-only PyTorch checkpoint: {e}") from None
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{path}: checkpoint must be a dict, got {type(data).__name__}")
    return data


def _size(ckpt: Mapping, key: str, path: Path) -> int:
    value = ckpt.get(key)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{path}: checkpoint field '{key}' must be a positive integer, "
                           f"got {value!r}")
    return value


def build_mlp(ckpt: Mapping, path: Path) -> nn.Sequential:
    """Linear-ReLU-Dropout-Linear from a template checkpoint. The two Linear layers'
    weights and biases are taken in order of appearance, whatever their key names."""
    sizes = [_size(ckpt, k, path) for k in ("input_size", "hidden_size", "num_classes")]
    state = ckpt.get("state_dict", ckpt.get("model_state_dict", ckpt))
    if not isinstance(state, Mapping):
        raise InvalidInput(f"{path}: checkpoint 'state_dict' must be a dict of tensors")
    tensors = [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor)]
    weights = [v for k, v in tensors if str(k).endswith("weight") and v.dim() == 2]
    biases = [v for k, v in tensors if str(k).endswith("bias") and v.dim() == 1]
    if len(weights) != 2 or len(biases) != 2:
        raise InvalidInput(
            f"{path}: expected the weight and bias of 2 Linear layers, found "
            f"{len(weights)} weight(s) and {len(biases)} bias(es) in "
            f"{[k for k, _ in tensors]}"
        )
    n_in, hidden, classes = sizes
    model = nn.Sequential(
        nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(), nn.Linear(hidden, classes)
    )
    for layer, weight, bias in zip((model[0], model[3]), weights, biases, strict=True):
        if weight.shape != layer.weight.shape or bias.shape != layer.bias.shape:
            raise InvalidInput(
                f"{path}: layer weight {list(weight.shape)} / bias {list(bias.shape)} do not "
                f"fit input_size={n_in}, hidden_size={hidden}, num_classes={classes}"
            )
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return model


def output_mapper(config: ModelConfig, module: nn.Module) -> Forward:
    """A forward that returns the model outputs as a tuple in `config.model_outputs` order,
    whether the network returns a tensor, a tuple/list or a dict keyed by output name."""
    names = [spec.name for spec in config.model_outputs]

    def forward(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = module(*inputs)
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, Mapping):
            missing = [n for n in names if n not in result]
            if missing:
                raise InvalidInput(f"model '{config.name}' returned no output {missing} "
                                   f"(returned {sorted(result)})")
            return tuple(result[n] for n in names)
        if not isinstance(result, Sequence) or len(result) != len(names):
            count = len(result) if isinstance(result, Sequence) else type(result).__name__
            raise InvalidInput(f"model '{config.name}' returned {count} outputs, its config "
                               f"declares {len(names)} model outputs {names}")
        return tuple(result)

    return forward


def module_bytes(module: nn.Module | AOTIModule) -> int:
    """Bytes of parameters and buffers (an AOTInductor package: its file's size)."""
    if isinstance(module, AOTIModule):
        return module.byte_size
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
