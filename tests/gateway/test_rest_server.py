"""The HTTP listener in-process, over a stand-in servicer: readiness follows serving and
drain, a drain lets requests in progress finish, the interceptor's refusals answer before
the body is read, and an unexpected error is a 500 with no detail."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
from prometheus_client import CollectorRegistry

from meshserve.gateway import rest
from meshserve.gateway.protection import Protection
from meshserve.pb.inference import grpc_service_pb2 as pb


class Servicer:
    """The servicer's methods the routes call; ModelInfer waits for `release`."""

    def __init__(self):
        self.ready = True
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready)

    async def ModelInfer(self, request, context):
        self.started.set()
        await self.release.wait()
        if request.model_name == "boom":
            raise RuntimeError("secret detail")
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1")
        response.outputs.add(name="y", datatype="FP32", shape=[2])
        response.raw_output_contents.append(np.array([1.5, 2], np.float32).tobytes())
        return response

    def __getattr__(self, name):  # the other guarded methods: never called here
        async def unused(request, context):
            raise AssertionError(name)
        return unused


BODY = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]})


async def started(servicer, max_concurrent=8):
    protection = Protection(None, {}, max_concurrent, CollectorRegistry())
    app, api = rest.create_app(servicer, protection, 1 << 20)
    server = rest.RestServer(app, api, "127.0.0.1", 0, grace_s=10)
    await server.start()
    return server, f"http://127.0.0.1:{server.port}"


def test_readiness_follows_serving_the_batcher_and_the_drain():
    async def main():
        servicer = Servicer()
        server, url = await started(servicer)
        async with aiohttp.ClientSession() as s:
            async def ready():
                async with s.get(url + "/v2/health/ready") as r:
                    return r.status, await r.json()

            assert await ready() == (503, {"ready": False})  # not serving yet
            server.api.serving = True
            assert await ready() == (200, {"ready": True})
            servicer.ready = False  # the batcher does not answer
            assert await ready() == (503, {"ready": False})
            servicer.ready = True
            # a request in progress when the drain starts is answered; readiness drops at once
            infer = asyncio.create_task(s.post(url + "/v2/models/m/infer", data=BODY))
            await servicer.started.wait()
            stopping = asyncio.create_task(server.stop())
            await asyncio.sleep(0)
            assert server.api.serving is False
            servicer.release.set()
            response = await infer
            assert response.status == 200
            assert (await response.json())["outputs"][0]["data"] == [1.5, 2.0]
            await stopping

    asyncio.run(main())


def test_an_unexpected_error_is_500_without_its_detail_and_shedding_is_429():
    async def main():
        servicer = Servicer()
        servicer.release.set()
        server, url = await started(servicer, max_concurrent=1)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(url + "/v2/models/boom/infer", data=BODY) as r:
                    assert r.status == 500
                    assert await r.json() == {"error": "internal error"}
                servicer.release.clear()
                servicer.started.clear()
                first = asyncio.create_task(s.post(url + "/v2/models/m/infer", data=BODY))
                await servicer.started.wait()
                async with s.post(url + "/v2/models/m/infer", data=BODY) as r:
                    assert r.status == 429 and "1 requests in progress" in (await r.json())["error"]
                servicer.release.set()
                assert (await first).status == 200
        finally:
            await server.stop()

    asyncio.run(main())
