"""A small Python client for meshserve's gateway over our generated stubs, and the
`meshserve infer` command. (Triton's `tritonclient.grpc` works unchanged too.)

    async with AsyncClient("127.0.0.1:8001") as client:
        result = await client.infer("digits", {"input": np.zeros((1, 64), np.float32)})
        result.outputs["predictions"]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from meshserve.common.grpcutil import MiB, channel_options
from meshserve.common.tensors import raw_bytes, to_numpy
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc
from meshserve.pb.meshserve.v1 import async_inference_pb2 as apb
from meshserve.pb.meshserve.v1 import async_inference_pb2_grpc as apb_grpc
from meshserve.pb.meshserve.v1 import routing_pb2 as rpb
from meshserve.pb.meshserve.v1 import routing_pb2_grpc as rpb_grpc

# The gateway the commands talk to unless --url says otherwise.
DEFAULT_URL = os.environ.get("MESHSERVE_URL", "127.0.0.1:8001")
URL_HELP = "gateway address [env MESHSERVE_URL; default 127.0.0.1:8001]"


@dataclass(frozen=True, slots=True)
class InferResult:
    model_version: str
    outputs: dict[str, np.ndarray]
    cache_hit: bool
    queue_us: int
    compute_us: int
    served_by: str = ""  # "model:version" that answered (a fallback may be another model)


def _read_pem(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


class AsyncClient:
    def __init__(self, target: str = "127.0.0.1:8001", max_message_mb: int = 64,
                 api_key: str = "", tls_ca: str = "", tls_cert: str = "", tls_key: str = ""):
        """api_key: sent as `authorization: Bearer <key>` on every call (gateways started
        with --api-keys-file require one). tls_ca: TLS, trusting this CA file (tls_cert and
        tls_key: a client certificate, for gateways that ask for one)."""
        options = channel_options(max_message_mb * MiB)
        interceptors = bearer_auth(api_key) if api_key else None
        if tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                _read_pem(tls_ca), _read_pem(tls_key), _read_pem(tls_cert))
            self.channel = grpc.aio.secure_channel(target, credentials, options=options,
                                                   interceptors=interceptors)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options,
                                                     interceptors=interceptors)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        version: str = "",
        priority: int = 0,
        timeout_s: float | None = None,
        use_cache: bool = True,
        request_id: str = "",
        route_key: str = "",
    ) -> InferResult:
        request = infer_request(model, inputs, outputs, version, priority, None, use_cache)
        request.id = request_id
        metadata = (("x-route-key", route_key),) if route_key else None
        response = await self.stub.ModelInfer(request, timeout=timeout_s, metadata=metadata)
        return infer_result(response)

    async def server_ready(self) -> bool:
        return (await self.stub.ServerReady(pb.ServerReadyRequest())).ready

    async def model_ready(self, model: str, version: str = "") -> bool:
        return (await self.stub.ModelReady(pb.ModelReadyRequest(name=model, version=version))).ready

    async def metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        return await self.stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version))

    async def config(self, model: str, version: str = ""):
        return (await self.stub.ModelConfig(pb.ModelConfigRequest(name=model, version=version))).config

    async def statistics(self, model: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        return await self.stub.ModelStatistics(
            pb.ModelStatisticsRequest(name=model, version=version)
        )

    async def index(self, ready_only: bool = False) -> pb.RepositoryIndexResponse:
        return await self.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready_only))

    async def load_model(self, model: str, versions: Sequence[str] = (),
                         default_version: str | None = None) -> None:
        request = pb.RepositoryModelLoadRequest(model_name=model)
        if versions:
            request.parameters["versions"].string_param = ",".join(versions)
        if default_version is not None:
            request.parameters["default_version"].string_param = default_version
        await self.stub.RepositoryModelLoad(request)

    async def unload_model(self, model: str) -> None:
        await self.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=model))

    # ------------------------------------------------------- async inference (tasks)

    @property
    def tasks_stub(self) -> apb_grpc.AsyncInferenceStub:
        stub = getattr(self, "_tasks_stub", None)
        if stub is None:
            stub = self._tasks_stub = apb_grpc.AsyncInferenceStub(self.channel)
        return stub

    async def submit(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        version: str = "",
        priority: int = 0,
        timeout_s: float | None = None,
        use_cache: bool = True,
        idempotency_key: str = "",
    ) -> str:
        """Queues one inference; its task id. timeout_s counts from submission: a task not
        done by then is EXPIRED (if still waiting) or FAILED (DEADLINE_EXCEEDED)."""
        request = infer_request(model, inputs, outputs, version, priority, timeout_s, use_cache)
        reply = await self.tasks_stub.Submit(
            apb.SubmitRequest(request=request, idempotency_key=idempotency_key))
        return reply.task_id

    async def submit_batch(
        self,
        model: str,
        batch: Sequence[Mapping[str, np.ndarray]],
        outputs: Sequence[str] = (),
        version: str = "",
        idempotency_keys: Sequence[str] = (),
    ) -> list[str]:
        """Queues one task per item of batch (all or none); their ids in order."""
        keys = list(idempotency_keys) or [""] * len(batch)
        requests = [
            apb.SubmitRequest(request=infer_request(model, inputs, outputs, version),
                              idempotency_key=key)
            for inputs, key in zip(batch, keys, strict=True)
        ]
        reply = await self.tasks_stub.SubmitBatch(apb.SubmitBatchRequest(requests=requests))
        return list(reply.task_ids)

    async def get_task(self, task_id: str) -> TaskResult:
        return task_result(await self.tasks_stub.Get(apb.GetRequest(task_id=task_id)))

    async def cancel_task(self, task_id: str) -> TaskResult:
        return task_result(await self.tasks_stub.Cancel(apb.CancelRequest(task_id=task_id)))

    async def watch_task(self, task_id: str) -> AsyncIterator[TaskResult]:
        """The task now, then each change of state until it is done."""
        async for task in self.tasks_stub.Watch(apb.GetRequest(task_id=task_id)):
            yield task_result(task)


    # ------------------------------------------------- traffic management (routing)

    @property
    def routing_stub(self) -> rpb_grpc.RoutingStub:
        stub = getattr(self, "_routing_stub", None)
        if stub is None:
            stub = self._routing_stub = rpb_grpc.RoutingStub(self.channel)
        return stub

    async def route_get(self, model: str) -> rpb.PolicyStatus:
        """The model's (or alias's) policy in force, with this gateway's per-route counts."""
        return await self.routing_stub.Get(rpb.GetPolicyRequest(model=model))

    async def route_set(
        self,
        model: str,
        split: Mapping[str, float] | None = None,
        shadow: Mapping[str, float] | None = None,
        fallback: Sequence[str] = (),
        fallback_queue_us: int = 0,
        alias: rpb.AliasPolicy | None = None,
        max_shadow_in_flight: int = 0,
    ) -> rpb.PolicyStatus:
        """Sets a runtime policy: split {version: weight}, shadow {version: percent},
        fallback ["model" or "model:version", ...]; every gateway applies it."""
        policy = rpb.RoutingPolicy(
            model=model,
            split=[rpb.VersionWeight(version=v, weight=w) for v, w in (split or {}).items()],
            shadow=[rpb.VersionWeight(version=v, weight=w) for v, w in (shadow or {}).items()],
            fallback=[rpb.RouteTarget(model=m, version=v)
                      for m, _, v in (t.partition(":") for t in fallback)],
            fallback_queue_us=fallback_queue_us, max_shadow_in_flight=max_shadow_in_flight,
        )
        if alias is not None:
            policy.alias.CopyFrom(alias)
        return await self.routing_stub.Set(rpb.SetPolicyRequest(policy=policy))

    async def route_clear(self, model: str) -> rpb.PolicyStatus:
        """Drops the runtime policy (the config.json one, if any, applies again)."""
        return await self.routing_stub.Set(
            rpb.SetPolicyRequest(policy=rpb.RoutingPolicy(model=model), clear=True))

    async def route_promote(self, model: str, version: str) -> rpb.PolicyStatus:
        return await self.routing_stub.Promote(rpb.PromoteRequest(model=model, version=version))

    async def route_watch(self, model: str = "") -> AsyncIterator[rpb.PolicyChange]:
        async for change in self.routing_stub.Watch(rpb.WatchPoliciesRequest(model=model)):
            yield change


class _Bearer:
    def __init__(self, api_key: str):
        self.header = ("authorization", f"Bearer {api_key}")

    def _details(self, details):
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self.header)
        return details._replace(metadata=metadata)


# grpc.aio files an interceptor under the FIRST call kind it implements only, so one
# class per kind (one class with all four would leave streaming calls without the key).
class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


API_KEY_ENV = "MESHSERVE_API_KEY"
API_KEY_HELP = (f"API key (gateways with --api-keys-file); default: env {API_KEY_ENV}, which "
                "keeps the key out of the shell history and the process list")


def env_api_key() -> str:
    return os.environ.get(API_KEY_ENV, "")


def bearer_auth(api_key: str) -> list:
    """Interceptors adding `authorization: Bearer <key>` to every call of a channel."""
    return [kind(api_key) for kind in (_BearerUnaryUnary, _BearerUnaryStream,
                                       _BearerStreamUnary, _BearerStreamStream)]


# ------------------------------------------------------------------- meshserve infer


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="meshserve infer", description="One inference request.")
    p.add_argument("model")
    p.add_argument("--url", default=DEFAULT_URL, help=URL_HELP)
    p.add_argument("--api-key", default=env_api_key(), help=API_KEY_HELP)
    p.add_argument("--version", default="", help="model version (default: the model's default)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help='JSON: a list for a one-input model, or {"name": list}')
    source.add_argument("--input-file", help="a JSON file in the --input format")
    p.add_argument("--output", action="append", default=[], help="output to return (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="skip the prediction cache")
    p.add_argument("--timeout-s", type=float, default=10.0)
    p.add_argument("--tls-ca", default="", help="TLS: the CA that signed the gateway's certificate")
    p.add_argument("--tls-cert", default="", help="TLS client certificate (if the gateway asks)")
    p.add_argument("--tls-key", default="", help="key of --tls-cert")
    return p.parse_args(argv)


async def _infer(args: argparse.Namespace) -> int:
    text = Path(args.input_file).read_text() if args.input_file else args.input
    async with AsyncClient(args.url, api_key=args.api_key, tls_ca=args.tls_ca,
                           tls_cert=args.tls_cert, tls_key=args.tls_key) as client:
        try:
            inputs = await _json_inputs(client, args.model, args.version, text)
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
        result = await client.infer(args.model, inputs, args.output, args.version,
                                    timeout_s=args.timeout_s, use_cache=not args.no_cache)
    print(f"model {args.model} version {result.model_version}  cache_hit={result.cache_hit} "
          f"queue_us={result.queue_us} compute_us={result.compute_us} "
          f"served_by={result.served_by}")
    for name, array in result.outputs.items():
        values = np.array2string(array, precision=4, suppress_small=True, max_line_width=100)
        print(f"{name} {array.dtype} {list(array.shape)}:\n{values}")
    return 0


def to_numpy_dtype(datatype: str):
    from meshserve.common.datatypes import datatype as lookup

    return lookup(datatype).numpy


def main(argv: list[str]) -> int:
    args = _parse(argv)
    try:
        return asyncio.run(_infer(args))
    except grpc.aio.AioRpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


# ------------------------------------------------------- async inference helpers


@dataclass(frozen=True, slots=True)
class TaskResult:
    task_id: str
    state: str  # PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED
    result: InferResult | None  # when SUCCEEDED
    error_code: str  # a grpc.StatusCode name ("" when none)
    error_message: str
    submitted_unix_ms: int
    finished_unix_ms: int

    @property
    def done(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")


def infer_request(model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] = (),
                  version: str = "", priority: int = 0, timeout_s: float | None = None,
                  use_cache: bool = True) -> pb.ModelInferRequest:
    """A ModelInferRequest with raw tensors; timeout_s becomes Triton's `timeout` parameter
    (for tasks: a deadline counted from submission)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, array in inputs.items():
        dtype, shape, data = raw_bytes(np.asarray(array))
        request.inputs.add(name=name, datatype=dtype, shape=shape)
        request.raw_input_contents.append(data)
    for name in outputs:
        request.outputs.add(name=name)
    if priority:
        request.parameters["priority"].int64_param = priority
    if timeout_s is not None:
        request.parameters["timeout"].int64_param = max(1, int(timeout_s * 1e6))
    if not use_cache:
        request.parameters["cache"].bool_param = False
    return request


def infer_result(response: pb.ModelInferResponse) -> InferResult:
    arrays = {
        t.name: to_numpy(t.name, t.datatype, t.shape, raw)
        for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    p = response.parameters
    return InferResult(response.model_version, arrays, p["cache_hit"].bool_param,
                       p["queue_us"].int64_param, p["compute_us"].int64_param,
                       p["served_by"].string_param)


def task_result(task: apb.Task) -> TaskResult:
    code = ""
    if task.error_code:
        code = next((c.name for c in grpc.StatusCode if c.value[0] == task.error_code),
                    str(task.error_code))
    return TaskResult(
        task.task_id, apb.Task.State.Name(task.state),
        infer_result(task.response) if task.HasField("response") else None,
        code, task.error_message, task.submitted_unix_ms, task.finished_unix_ms,
    )


# ------------------------------------------------- meshserve submit / meshserve result


async def _json_inputs(client: AsyncClient, model: str, version: str, text: str) -> dict:
    """JSON in the `meshserve infer --input` format (a list for a one-input model, or
    {"name": list}) -> named arrays, with a batch dimension added to a single row."""
    data = json.loads(text)
    meta = await client.metadata(model, version)
    if not isinstance(data, dict):
        if len(meta.inputs) != 1:
            names = ", ".join(t.name for t in meta.inputs)
            raise ValueError(f"model '{model}' has inputs {names}: give a JSON object")
        data = {meta.inputs[0].name: data}
    inputs = {}
    for spec in meta.inputs:
        if spec.name in data:
            array = np.asarray(data[spec.name], dtype=to_numpy_dtype(spec.datatype))
            inputs[spec.name] = array[None] if len(spec.shape) == array.ndim + 1 else array
    for name in data:
        inputs.setdefault(name, np.asarray(data[name]))  # let the gateway name what is wrong
    return inputs


async def _submit(args: argparse.Namespace) -> int:
    async with AsyncClient(args.url, api_key=args.api_key) as client:
        inputs = await _json_inputs(client, args.model, args.version,
                                    Path(args.input_file).read_text())
        task_id = await client.submit(args.model, inputs, args.output, args.version,
                                      idempotency_key=args.idempotency_key,
                                      use_cache=not args.no_cache)
    print(task_id)
    return 0


async def _result(args: argparse.Namespace) -> int:
    async with AsyncClient(args.url, api_key=args.api_key) as client:
        if args.wait:
            states = [t async for t in client.watch_task(args.task_id)]
            task = states[-1]
        else:
            task = await client.get_task(args.task_id)
    print(f"task {task.task_id} {task.state}")
    if task.error_code or task.error_message:
        print(f"error: {task.error_code}: {task.error_message}")
    if task.result is not None:
        r = task.result
        print(f"model version {r.model_version}  cache_hit={r.cache_hit} "
              f"queue_us={r.queue_us} compute_us={r.compute_us}")
        for name, array in r.outputs.items():
            values = np.array2string(array, precision=4, suppress_small=True, max_line_width=100)
            print(f"{name} {array.dtype} {list(array.shape)}:\n{values}")
    return 0 if task.state in ("SUCCEEDED", "PENDING", "RUNNING") else 1


def submit_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="meshserve submit",
                                description="Queue one async inference; prints its task id.")
    p.add_argument("model")
    p.add_argument("--url", default=DEFAULT_URL, help=URL_HELP)
    p.add_argument("--api-key", default=env_api_key(), help=API_KEY_HELP)
    p.add_argument("--version", default="")
    p.add_argument("--input-file", required=True, help="JSON, as for `meshserve infer`")
    p.add_argument("--output", action="append", default=[], help="output to return (repeatable)")
    p.add_argument("--idempotency-key", default="")
    p.add_argument("--no-cache", action="store_true")
    try:
        return asyncio.run(_submit(p.parse_args(argv)))
    except grpc.aio.AioRpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


def result_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="meshserve result", description="An async task's state "
                                "and result (exit 0: succeeded or not done yet).")
    p.add_argument("task_id")
    p.add_argument("--url", default=DEFAULT_URL, help=URL_HELP)
    p.add_argument("--api-key", default=env_api_key(), help=API_KEY_HELP)
    p.add_argument("--wait", action="store_true", help="wait until the task is done")
    try:
        return asyncio.run(_result(p.parse_args(argv)))
    except grpc.aio.AioRpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------- meshserve route


def _pairs(text: str, flag: str) -> dict[str, float]:
    """"1=90,2=10" -> {"1": 90.0, "2": 10.0}."""
    out = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        version, sep, weight = item.partition("=")
        try:
            out[version.strip()] = float(weight)
        except ValueError:
            sep = ""
        if not sep:
            raise SystemExit(f"meshserve route set: {flag}: expected VERSION=NUMBER, got {item!r}")
    return out


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


async def _route(args: argparse.Namespace) -> int:
    async with AsyncClient(args.url, api_key=args.api_key) as client:
        if args.action == "get":
            status = await client.route_get(args.model)
        elif args.action == "promote":
            status = await client.route_promote(args.model, args.version)
        elif args.action == "watch":
            async for change in client.route_watch(args.model):
                status = rpb.PolicyStatus(policy=change.policy, has_policy=not change.deleted)
                print(format_status(change.model, status), flush=True)
            return 0
        elif args.clear:
            status = await client.route_clear(args.model)
        else:
            alias = None
            if args.alias_preferred or args.alias_cheaper:
                pref, _, pv = args.alias_preferred.partition(":")
                cheap, _, cv = args.alias_cheaper.partition(":")
                alias = rpb.AliasPolicy(
                    preferred=rpb.RouteTarget(model=pref, version=pv),
                    cheaper=rpb.RouteTarget(model=cheap, version=cv),
                    high_queue_us=args.high_queue_us, low_queue_us=args.low_queue_us,
                    high_latency_us=args.high_latency_us, low_latency_us=args.low_latency_us,
                    min_dwell_s=args.min_dwell_s)
            status = await client.route_set(
                args.model, _pairs(args.split, "--split"), _pairs(args.shadow, "--shadow"),
                [t.strip() for t in args.fallback.split(",") if t.strip()],
                args.fallback_queue_us, alias)
    print(format_status(args.model, status))
    return 0


def route_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="meshserve route",
                                description="Traffic management: version splits, canaries, "
                                "shadows, fallback, cost-aware aliases.")
    p.add_argument("--url", default=DEFAULT_URL, help=URL_HELP)
    p.add_argument("--api-key", default=env_api_key(), help=API_KEY_HELP)
    sub = p.add_subparsers(dest="action", required=True)
    g = sub.add_parser("get", help="the policy in force and this gateway's per-route counts")
    g.add_argument("model")
    w = sub.add_parser("watch", help="print the policy, then every change")
    w.add_argument("model", nargs="?", default="")
    s = sub.add_parser("set", help="set a runtime policy (every gateway applies it)")
    s.add_argument("model")
    s.add_argument("--split", default="", help="VERSION=WEIGHT,... e.g. 1=90,2=10")
    s.add_argument("--shadow", default="", help="VERSION=PERCENT,... mirrored, never answered")
    s.add_argument("--fallback", default="", help="model[:version],... tried in order")
    s.add_argument("--fallback-queue-us", type=int, default=0,
                   help="also fall back when the chosen version's EWMA queue time is above this")
    s.add_argument("--alias-preferred", default="", help="alias: the expensive model[:version]")
    s.add_argument("--alias-cheaper", default="", help="alias: the cheaper model[:version]")
    s.add_argument("--high-queue-us", type=int, default=0)
    s.add_argument("--low-queue-us", type=int, default=0)
    s.add_argument("--high-latency-us", type=int, default=0)
    s.add_argument("--low-latency-us", type=int, default=0)
    s.add_argument("--min-dwell-s", type=float, default=5.0)
    s.add_argument("--clear", action="store_true", help="drop the runtime policy")
    pr = sub.add_parser("promote", help="make VERSION the primary at 100%%")
    pr.add_argument("model")
    pr.add_argument("version")
    for parser in (g, w, s, pr):
        parser.add_argument("--url", default=argparse.SUPPRESS, help="gateway address")
        parser.add_argument("--api-key", default=argparse.SUPPRESS, help="API key")
    try:
        return asyncio.run(_route(p.parse_args(argv)))
    except grpc.aio.AioRpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
