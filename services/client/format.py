"""What the client commands print: results, tasks and routing policies as text."""

from __future__ import annotations

import numpy as np

from meshserve.client.sdk import InferResponse, TaskResult
from meshserve.pb.meshserve.v1 import routing_pb2 as rpb


def format_outputs(outputs: dict[str, np.ndarray]) -> str:
    return "\n".join(
        f"{name} {array.dtype} {list(array.shape)}:\n"
        + np.array2string(array, precision=4, suppress_small=True, max_line_width=100)
        for name, array in outputs.items())


def format_result(model: str, result: InferResponse) -> str:
    head = (f"model {model} version {result.model_version}  cache_hit={result.cache_hit} "
            f"queue_us={result.queue_us} compute_us={result.compute_us} "
            f"served_by={result.served_by}")
    return "\n".join([head, format_outputs(result.outputs)] if result.outputs else [head])


def format_task(task: TaskResult) -> str:
    lines = [f"task {task.task_id} {task.state}"]
    if task.error_code or task.error_message:
        lines.append(f"error: {task.error_code}: {task.error_message}")
    if task.result is not None:
        r = task.result
        lines.append(f"model version {r.model_version}  cache_hit={r.cache_hit} "
                     f"queue_us={r.queue_us} compute_us={r.compute_us}")
        if r.outputs:
            lines.append(format_outputs(r.outputs))
    return "\n".join(lines)


def format_status(model: str, status: rpb.PolicyStatus) -> str:
    lines = []
    if not status.has_policy:
        lines.append(f"{model}: no routing policy (every request goes to the default version)")
    else:
        p = status.policy
        lines.append(f"{model}: {p.source} policy, revision {p.revision}")
        if p.HasField("alias"):
            a = p.alias
            name = lambda t: f"{t.model}:{t.version}" if t.version else t.model  # noqa: E731
            lines.append(f"  alias     preferred {name(a.preferred)}, cheaper {name(a.cheaper)}"
                         f" (now {status.alias_target})")
            marks = [f"{kind} > {high}us (back below {low}us)"
                     for kind, high, low in (("queue", a.high_queue_us, a.low_queue_us),
                                             ("latency", a.high_latency_us, a.low_latency_us))
                     if high]
            lines.append(f"  switch    {' or '.join(marks)}; dwell {a.min_dwell_s:g}s")
        lines.append("  split     " + (" ".join(f"{w.version}={w.weight:g}%" for w in p.split)
                                      or "- (default version)"))
        lines.append("  shadow    " + (" ".join(f"{w.version}={w.weight:g}%" for w in p.shadow)
                                      or "-"))
        fb = [f"{t.model}:{t.version}" if t.version else t.model for t in p.fallback]
        extra = f" (also when queue > {p.fallback_queue_us}us)" if p.fallback_queue_us else ""
        lines.append("  fallback  " + (", ".join(fb) + extra if fb else "-"))
    if status.stats:
        lines.append("  routed by this gateway:")
        for s in status.stats:
            agreement = (f"  agree={s.agree} disagree={s.disagree}"
                         if s.route == "shadow" else "")
            name = f"{s.model} -> {s.version}" if s.route == "alias" else f"{s.model}:{s.version}"
            lines.append(f"    {name:<16} {s.route:<9} requests={s.requests} "
                         f"errors={s.errors}{agreement}")
    return "\n".join(lines)
