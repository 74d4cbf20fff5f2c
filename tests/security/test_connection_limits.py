"""Every server bounds what one connection may hold: streams at once, idle time, age."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from meshserve.common import grpcutil
from meshserve.common.errors import ConfigError

METHOD = "/test.Hold/Call"


def hold_server(limits: grpcutil.ConnectionLimits, release: asyncio.Event, started: list):
    """A server whose one method waits for `release` (counting the calls it started)."""

    async def call(request, context):
        started.append(1)
        await release.wait()
        return b"ok"

    handler = grpc.method_handlers_generic_handler("test.Hold", {
        "Call": grpc.unary_unary_rpc_method_handler(call)})
    server, port, _health = grpcutil.new_server("127.0.0.1:0", [], limits=limits)
    server.add_generic_rpc_handlers((handler,))
    return server, port


def test_a_connection_holds_at_most_max_concurrent_streams():
    async def main():
        release, started = asyncio.Event(), []
        server, port = hold_server(grpcutil.ConnectionLimits(max_concurrent_streams=1),
                                   release, started)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary(METHOD)
                first = asyncio.ensure_future(call(b"", timeout=60))
                while not started:
                    await asyncio.sleep(0.01)
                # The second call waits for a stream the server does not grant.
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call(b"", timeout=1.0)
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert len(started) == 1
                release.set()
                assert await first == b"ok"
                assert await call(b"", timeout=60) == b"ok"
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_an_idle_connection_is_closed_by_the_server():
    async def main():
        release = asyncio.Event()
        release.set()
        server, port = hold_server(grpcutil.ConnectionLimits(max_idle_s=0.5), release, [])
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert await channel.unary_unary(METHOD)(b"", timeout=60) == b"ok"
                assert channel.get_state() == grpc.ChannelConnectivity.READY
                # The server's GOAWAY moves the channel out of READY (no call is open).
                await asyncio.wait_for(
                    channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 30)
                assert channel.get_state() != grpc.ChannelConnectivity.READY
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_limits_are_options_of_every_server_and_validated():
    options = dict(grpcutil.server_options(limits=grpcutil.ConnectionLimits(
        max_concurrent_streams=7, max_idle_s=2, max_age_s=3, max_age_grace_s=4)))
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.max_connection_idle_ms"] == 2000
    assert options["grpc.max_connection_age_ms"] == 3000
    assert options["grpc.max_connection_age_grace_ms"] == 4000
    defaults = dict(grpcutil.server_options())
    assert defaults["grpc.max_concurrent_streams"] == grpcutil.INTERNAL_LIMITS.max_concurrent_streams
    assert "grpc.max_connection_idle_ms" in defaults
    with pytest.raises(ConfigError, match="max-concurrent-streams"):
        grpcutil.ConnectionLimits(max_concurrent_streams=0)
