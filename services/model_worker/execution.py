"""One batch through a loaded model: validation against the config, the forward, the
classifier post-processing, and raw bytes out. Imports neither grpc nor protobuf."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from meshserve.common import tensors, validation
from meshserve.common.errors import InvalidInput
from meshserve.common.repository import ModelConfig
from meshserve.common.validation import WireTensor


@dataclass(frozen=True, slots=True)
class BatchRequest:
    batch_id: int
    model: str
    version: str
    inputs: tuple[WireTensor, ...]
    # Outputs to return; empty: every output of the model.
    outputs: tuple[str, ...] = ()
    # W3C traceparents of the requests in the batch (for logs and spans).
    traceparents: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    batch_id: int
    # An error as (grpc status code value, message); code 0 when outputs are set.
    code: int = 0
    message: str = ""
    outputs: tuple[WireTensor, ...] = ()
    compute_ns: int = 0
    executed_batch_size: int = 0
    rows: int = 0


def requested_outputs(config: ModelConfig, wanted: Sequence[str]) -> tuple[str, ...]:
    """The outputs to compute, in the config's order; InvalidInput for unknown names."""
    declared = [t.name for t in config.outputs]
    if not wanted:
        return tuple(declared)
    unknown = [n for n in wanted if n not in declared]
    if unknown:
        raise InvalidInput(f"model '{config.name}' has no output {unknown[0]!r} "
                           f"(outputs: {', '.join(declared)})")
    return tuple(n for n in declared if n in wanted)


def validate_inputs(config: ModelConfig, batch: BatchRequest) -> tuple[list[torch.Tensor], int]:
    """Input tensors in the config's order (read-only views of the bytes) and the row count.
    The same checks as the gateway's, on the joined batch (common/validation.py)."""
    rows = validation.validate_inputs(config, batch.inputs)
    given = {t.name: t for t in batch.inputs}
    ordered = (given[spec.name] for spec in config.inputs)
    return [tensors.to_torch(t.name, t.datatype, t.shape, t.data) for t in ordered], rows


def postprocess(
    config: ModelConfig, outputs: Sequence[torch.Tensor], wanted: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Model outputs plus the classifier's derived ones, only those in `wanted`."""
    values = dict(zip((t.name for t in config.model_outputs), outputs, strict=True))
    k = config.classifier
    if k is None:
        return {n: values[n] for n in wanted}
    logits = values[k.logits]
    derived: dict[str, torch.Tensor] = {}
    need_probs = any(n in wanted for n in (k.probabilities, k.top_k_probabilities) if n)
    if need_probs:
        probs = torch.softmax(logits.float(), dim=-1)
        if k.probabilities:
            derived[k.probabilities] = probs
    if k.predictions and k.predictions in wanted:
        derived[k.predictions] = torch.argmax(logits, dim=-1).to(torch.int64)
    if k.top_k and any(n in wanted for n in (k.top_k_indices, k.top_k_probabilities) if n):
        source = probs if need_probs else logits
        top_values, top_indices = torch.topk(source, k.top_k, dim=-1)
        if k.top_k_indices:
            derived[k.top_k_indices] = top_indices.to(torch.int64)
        if k.top_k_probabilities:
            derived[k.top_k_probabilities] = top_values
    values.update(derived)
    return {n: values[n] for n in wanted}


def run_batch(config: ModelConfig, runner, batch: BatchRequest) -> BatchOutcome:
    """Validates, runs and encodes one batch (in a worker thread). Raises InvalidInput."""
    wanted = requested_outputs(config, batch.outputs)
    inputs, rows = validate_inputs(config, batch)
    start = time.perf_counter_ns()
    outputs, executed = runner.run(inputs)
    if config.max_batch_size == 0:  # one unbatched request: no batch dimension
        executed = 1
    compute_ns = time.perf_counter_ns() - start
    encoded = []
    for name, value in postprocess(config, outputs, wanted).items():
        dtype, shape, data = tensors.raw_bytes(value)
        encoded.append(WireTensor(name, dtype, tuple(shape), data))
    return BatchOutcome(
        batch.batch_id, outputs=tuple(encoded), compute_ns=compute_ns,
        executed_batch_size=executed, rows=rows,
    )
