"""Reduced precision and torch.compile of a loaded network. Imports neither grpc nor protobuf.

Precision: the weights are cast at load; floating inputs are cast to the compute dtype on
the way in and floating outputs to the datatype the config declares on the way out, both
inside the forward (so inside the CUDA graph when there is one).

torch.compile: the module is compiled at load and every bucket is run (compiled) before
the model is READY; batches are padded to a bucket so no shape is compiled while serving.
"""

from __future__ import annotations

import torch
from torch import nn

from meshserve.common.datatypes import datatype
from meshserve.common.repository import CompileConfig, ModelConfig
from meshserve.model_worker.loader import Forward

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Compiled entries dynamo keeps per code object before it silently runs eagerly. Models of
# one class share code objects (every mlp_checkpoint is an nn.Sequential) and each bucket
# is one entry when dynamic is false, so the default of 8 is raised to this floor.
RECOMPILE_LIMIT = 64


def cast_network(module: nn.Module, precision: str) -> nn.Module:
    return module if precision == "fp32" else module.to(DTYPES[precision])


def with_precision(config: ModelConfig, forward: Forward) -> Forward:
    """Floating inputs in the compute dtype, floating outputs in the declared datatypes."""
    if config.precision == "fp32":
        return forward
    compute = DTYPES[config.precision]
    declared = [datatype(s.datatype).torch for s in config.model_outputs]

    def cast(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = forward(*(x.to(compute) if x.is_floating_point() else x for x in inputs))
        return tuple(
            o.to(d) if o.is_floating_point() and d.is_floating_point and o.dtype != d else o
            for o, d in zip(outputs, declared, strict=True)
        )

    return cast


def compile_network(module: nn.Module, c: CompileConfig) -> nn.Module:
    """torch.compile (lazy: it compiles on the first call of each shape)."""
    import torch._dynamo

    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    return torch.compile(module, mode=c.mode, dynamic=c.dynamic)


def compiler_message(e: BaseException, limit: int = 2000) -> str:
    """The compiler's own message, bounded (some carry whole generated sources)."""
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more chars)"
