"""The client commands of `meshserve`: infer, submit, result, route. Each takes the same
connection flags (connection_flags: address, TLS, API key) and runs under one error handler
(run): a gRPC error prints `error: CODE: details` and exits 1, a bad input exits 2."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np

from meshserve.client.format import format_result, format_status, format_task
from meshserve.client.sdk import AsyncClient
from meshserve.pb.meshserve.v1 import routing_pb2 as rpb

URL_ENV = "MESHSERVE_URL"
DEFAULT_URL = "127.0.0.1:8001"  # the gateway the commands talk to unless --url says otherwise
URL_HELP = f"gateway address [env {URL_ENV}; default {DEFAULT_URL}]"
API_KEY_ENV = "MESHSERVE_API_KEY"
API_KEY_HELP = (f"API key (gateways with --api-keys-file); default: env {API_KEY_ENV}, which "
                "keeps the key out of the shell history and the process list")


def env_api_key() -> str:
    return os.environ.get(API_KEY_ENV, "")


def connection_flags(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """--url, --api-key, --tls-ca, --tls-cert, --tls-key. suppress: no defaults (for a
    subcommand's parser, so the flags may stand before or after the subcommand)."""
    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--url", default=default(os.environ.get(URL_ENV, DEFAULT_URL)),
                        help=URL_HELP)
    parser.add_argument("--api-key", default=default(env_api_key()), help=API_KEY_HELP)
    parser.add_argument("--tls-ca", default=default(""),
                        help="TLS: the CA that signed the gateway's certificate")
    parser.add_argument("--tls-cert", default=default(""),
                        help="TLS client certificate (if the gateway asks)")
    parser.add_argument("--tls-key", default=default(""), help="key of --tls-cert")


def connect(args: argparse.Namespace) -> AsyncClient:
    """A client of the gateway the connection flags name."""
    return AsyncClient(args.url, api_key=args.api_key, tls_ca=args.tls_ca,
                       tls_cert=args.tls_cert, tls_key=args.tls_key)


def run(command: Callable[[argparse.Namespace], Awaitable[int]],
        args: argparse.Namespace) -> int:
    """Runs one command: its exit code; a gRPC error: 1; an input it cannot read: 2;
    Ctrl-C: 0 (how `route watch` stops)."""
    try:
        return asyncio.run(command(args))
    except grpc.aio.AioRpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # bad JSON or input names, unreadable files
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def to_numpy_dtype(datatype: str):
    from meshserve.common.datatypes import datatype as lookup

    return lookup(datatype).numpy


async def json_inputs(client: AsyncClient, model: str, version: str, text: str) -> dict:
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


# ------------------------------------------------------------------- meshserve infer


def infer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshserve infer", description="One inference request.")
    p.add_argument("model")
    connection_flags(p)
    p.add_argument("--version", default="", help="model version (default: the model's default)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help='JSON: a list for a one-input model, or {"name": list}')
    source.add_argument("--input-file", help="a JSON file in the --input format")
    p.add_argument("--output", action="append", default=[], help="output to return (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="skip the prediction cache")
    p.add_argument("--timeout-s", type=float, default=10.0)
    return p


async def infer(args: argparse.Namespace) -> int:
    text = Path(args.input_file).read_text() if args.input_file else args.input
    async with connect(args) as client:
        inputs = await json_inputs(client, args.model, args.version, text)
        result = await client.infer(args.model, inputs, args.output, args.version,
                                    timeout_s=args.timeout_s, use_cache=not args.no_cache)
    print(format_result(args.model, result))
    return 0


# ------------------------------------------------- meshserve submit / meshserve result


def submit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshserve submit",
                                description="Queue one async inference; prints its task id.")
    p.add_argument("model")
    connection_flags(p)
    p.add_argument("--version", default="")
    p.add_argument("--input-file", required=True, help="JSON, as for `meshserve infer`")
    p.add_argument("--output", action="append", default=[], help="output to return (repeatable)")
    p.add_argument("--idempotency-key", default="")
    p.add_argument("--no-cache", action="store_true")
    return p


async def submit(args: argparse.Namespace) -> int:
    text = Path(args.input_file).read_text()
    async with connect(args) as client:
        inputs = await json_inputs(client, args.model, args.version, text)
        task_id = await client.submit(args.model, inputs, args.output, args.version,
                                      idempotency_key=args.idempotency_key,
                                      use_cache=not args.no_cache)
    print(task_id)
    return 0


def result_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshserve result", description="An async task's state "
                                "and result (exit 0: succeeded or not done yet).")
    p.add_argument("task_id")
    connection_flags(p)
    p.add_argument("--wait", action="store_true", help="wait until the task is done")
    return p


async def result(args: argparse.Namespace) -> int:
    async with connect(args) as client:
        if args.wait:
            states = [t async for t in client.watch_task(args.task_id)]
            task = states[-1]
        else:
            task = await client.get_task(args.task_id)
    print(format_task(task))
    return 0 if task.state in ("SUCCEEDED", "PENDING", "RUNNING") else 1


# ------------------------------------------------------------------- meshserve route


def pairs(text: str, flag: str) -> dict[str, float]:
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


def _alias(args: argparse.Namespace) -> rpb.AliasPolicy | None:
    if not (args.alias_preferred or args.alias_cheaper):
        return None
    pref, _, pv = args.alias_preferred.partition(":")
    cheap, _, cv = args.alias_cheaper.partition(":")
    return rpb.AliasPolicy(
        preferred=rpb.RouteTarget(model=pref, version=pv),
        cheaper=rpb.RouteTarget(model=cheap, version=cv),
        high_queue_us=args.high_queue_us, low_queue_us=args.low_queue_us,
        high_latency_us=args.high_latency_us, low_latency_us=args.low_latency_us,
        min_dwell_s=args.min_dwell_s)


async def route(args: argparse.Namespace) -> int:
    async with connect(args) as client:
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
            status = await client.route_set(
                args.model, pairs(args.split, "--split"), pairs(args.shadow, "--shadow"),
                [t.strip() for t in args.fallback.split(",") if t.strip()],
                args.fallback_queue_us, _alias(args))
    print(format_status(args.model, status))
    return 0


def route_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshserve route",
                                description="Traffic management: version splits, canaries, "
                                "shadows, fallback, cost-aware aliases.")
    connection_flags(p)
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
        connection_flags(parser, suppress=True)
    return p


# name: (parser, command)
COMMANDS = {
    "infer": (infer_parser, infer),
    "submit": (submit_parser, submit),
    "result": (result_parser, result),
    "route": (route_parser, route),
}


def main(name: str, argv: list[str]) -> int:
    """`meshserve NAME ARGV...` for a client command NAME (a key of COMMANDS)."""
    parser, command = COMMANDS[name]
    return run(command, parser().parse_args(argv))
