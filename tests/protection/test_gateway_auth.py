"""API keys on a real gateway process: every outcome and its status code, streams,
management calls, async submit, tritonclient's headers=, health without a key, reload."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from meshserve.client import AsyncClient
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.protection.conftest import X, bearer, infer_request, metric, write_keys

FULL = {"name": "ops", "key": "key-ops", "models": ["*"]}
DIGITS = {"name": "team-digits", "key": "key-digits", "models": ["digits"]}
# priority 5 is out of range for digits (2 levels): shows that the default applies
PRIO = {"name": "team-prio", "key": "key-prio", "models": ["digits"], "priority": 5}
INFER_ONLY = {"name": "app", "key": "key-app", "models": ["*"], "scopes": ["infer"]}
ADMIN_ONLY = {"name": "admin", "key": "key-admin", "models": ["*"], "scopes": ["admin"]}


@pytest.fixture
def gateway(start_gateway, tmp_path):
    keys = tmp_path / "keys.json"
    write_keys(keys, FULL, DIGITS, PRIO, INFER_ONLY, ADMIN_ONLY)
    g = start_gateway("--api-keys-file", str(keys))
    g.keys_path = keys
    return g


def run(coro):
    return asyncio.run(coro)


async def call(address, method: str, request, metadata=None):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return await getattr(stub, method)(request, metadata=metadata, timeout=30)


def code_of(address, method, request, metadata=None) -> grpc.StatusCode:
    try:
        run(call(address, method, request, metadata))
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_every_outcome_of_model_infer(gateway):
    a = gateway.address
    assert code_of(a, "ModelInfer", infer_request()) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(a, "ModelInfer", infer_request(), bearer("nope")) == grpc.StatusCode.UNAUTHENTICATED
    for bad in ("Basic a2V5", "Bearer", "key-digits"):
        md = (("authorization", bad),)
        assert code_of(a, "ModelInfer", infer_request(), md) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(a, "ModelInfer", infer_request(), bearer("key-digits")) == grpc.StatusCode.OK
    assert code_of(a, "ModelInfer", infer_request(), (("authorization", "bearer  key-digits"),)) \
        == grpc.StatusCode.OK  # the scheme is case-insensitive
    assert code_of(a, "ModelInfer", infer_request("other"), bearer("key-digits")) \
        == grpc.StatusCode.PERMISSION_DENIED
    # a key allowed every model reaches the model check: unknown -> NOT_FOUND
    assert code_of(a, "ModelInfer", infer_request("other"), bearer("key-ops")) \
        == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as e:
        run(call(a, "ModelInfer", infer_request("other"), bearer("key-digits")))
    assert "team-digits" in e.value.details() and "other" in e.value.details()
    assert metric(gateway, "meshserve_gateway_auth_failures_total", 'reason="missing"') == 1
    assert metric(gateway, "meshserve_gateway_auth_failures_total", 'reason="unknown_key"') == 1
    assert metric(gateway, "meshserve_gateway_auth_failures_total", 'reason="malformed"') == 3
    assert metric(gateway, "meshserve_gateway_auth_failures_total",
                  'reason="forbidden_model"') == 2


def test_the_keys_priority_applies_and_is_a_floor(gateway):
    """No priority: the key's (5, out of range for digits: INVALID_ARGUMENT shows it
    applied). A request asking for a higher one (1) than its key's gets the key's too."""
    a = gateway.address
    with pytest.raises(grpc.aio.AioRpcError) as e:
        run(call(a, "ModelInfer", infer_request(), bearer("key-prio")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority 5" in e.value.details()
    request = infer_request()
    request.parameters["priority"].int64_param = 1
    with pytest.raises(grpc.aio.AioRpcError) as e:
        run(call(a, "ModelInfer", request, bearer("key-prio")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority 5" in e.value.details()
    request.parameters["priority"].int64_param = 2
    assert code_of(a, "ModelInfer", request, bearer("key-digits")) == grpc.StatusCode.OK


def test_stream_messages_are_checked_one_by_one(gateway):
    async def main():
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            requests = [infer_request("digits", "1"), infer_request("other", "2"),
                        infer_request("digits", "3")]
            responses = [r async for r in stub.ModelStreamInfer(
                iter(requests), metadata=bearer("key-digits"), timeout=30)]
            by_id = {r.infer_response.id: r for r in responses}
            assert sorted(by_id) == ["1", "2", "3"]
            assert by_id["1"].error_message == "" and by_id["3"].error_message == ""
            assert "may not use model 'other'" in by_id["2"].error_message
            # no key: the stream ends at once (read the status without racing our writes)
            unauthenticated = stub.ModelStreamInfer(timeout=30)
            assert await unauthenticated.code() == grpc.StatusCode.UNAUTHENTICATED

    run(main())
    assert metric(gateway, "meshserve_gateway_inflight_requests") == 0


def test_model_scoped_management_calls_and_health(gateway):
    a = gateway.address
    meta = pb.ModelMetadataRequest(name="digits")
    assert code_of(a, "ModelMetadata", meta) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(a, "ModelMetadata", meta, bearer("key-digits")) == grpc.StatusCode.OK
    assert code_of(a, "ModelMetadata", pb.ModelMetadataRequest(name="other"),
                   bearer("key-digits")) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(a, "ModelReady", pb.ModelReadyRequest(name="other"),
                   bearer("key-digits")) == grpc.StatusCode.PERMISSION_DENIED
    # statistics of every model needs "*"
    assert code_of(a, "ModelStatistics", pb.ModelStatisticsRequest(),
                   bearer("key-digits")) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(a, "ModelStatistics", pb.ModelStatisticsRequest(),
                   bearer("key-ops")) == grpc.StatusCode.OK
    assert code_of(a, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(
        model_name="other"), bearer("key-digits")) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(a, "ServerLive", pb.ServerLiveRequest()) == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(a) as channel:  # probes need no key
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_our_client_and_async_submit(gateway):
    async def main():
        async with AsyncClient(gateway.address, api_key="key-digits") as client:
            result = await client.infer("digits", {"input": X}, route_key="r1")
            assert result.outputs["predictions"].shape == (1,)
            task_id = await client.submit("digits", {"input": X})
            assert task_id
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.submit("other", {"input": X})
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert len(await client.submit_batch("digits", [{"input": X}, {"input": X}])) == 2
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.route_get("other")
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            await client.route_get("digits")
        async with AsyncClient(gateway.address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.submit("digits", {"input": X})
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

    run(main())


def test_tritonclient_sends_the_key_as_headers(gateway):
    client = tc.InferenceServerClient(gateway.address)
    try:
        inp = tc.InferInput("input", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        headers = {"authorization": "Bearer key-digits"}
        result = client.infer("digits", [inp], headers=headers)
        assert result.as_numpy("predictions").shape == (1,)
        assert client.is_model_ready("digits", headers=headers)
        with pytest.raises(InferenceServerException) as e:
            client.infer("digits", [inp])
        assert "UNAUTHENTICATED" in str(e.value.status())
        with pytest.raises(InferenceServerException) as e:
            client.infer("digits", [inp], headers={"authorization": "Bearer key-wrong"})
        assert "UNAUTHENTICATED" in str(e.value.status())
    finally:
        client.close()


def test_keys_reload_on_change_and_a_broken_file_keeps_them(gateway):
    a = gateway.address
    new = {"name": "newcomer", "key": "key-new", "models": ["digits"]}
    write_keys(gateway.keys_path, FULL, DIGITS, PRIO, INFER_ONLY, ADMIN_ONLY, new)
    deadline = time.monotonic() + 15
    while code_of(a, "ModelInfer", infer_request(), bearer("key-new")) != grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "the new key was never accepted"
        time.sleep(0.2)
    gateway.keys_path.write_text('{"keys": [{"name": "broken"}]}')
    time.sleep(2.5)  # past the once-a-second check: the broken file was read and refused
    assert code_of(a, "ModelInfer", infer_request(), bearer("key-new")) == grpc.StatusCode.OK
    assert "reload failed, keeping the previous 6 key(s)" in gateway.output()


def test_scopes_infer_and_admin(gateway):
    """infer: inference and metadata, never control; admin: control and statistics, never
    inference; a key written without scopes (FULL) keeps both."""
    a = gateway.address
    unload = pb.RepositoryModelUnloadRequest(model_name="digits")
    stats = pb.ModelStatisticsRequest(name="digits")
    assert code_of(a, "ModelInfer", infer_request(), bearer("key-app")) == grpc.StatusCode.OK
    assert code_of(a, "ModelMetadata", pb.ModelMetadataRequest(name="digits"),
                   bearer("key-app")) == grpc.StatusCode.OK
    with pytest.raises(grpc.aio.AioRpcError) as e:
        run(call(a, "RepositoryModelUnload", unload, bearer("key-app")))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'app' lacks the 'admin' scope" in e.value.details()
    for method, request in (("RepositoryModelLoad", pb.RepositoryModelLoadRequest(
            model_name="digits")), ("ModelStatistics", stats),
            ("LogSettings", pb.LogSettingsRequest())):
        assert code_of(a, method, request, bearer("key-app")) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(a, "ModelStatistics", stats, bearer("key-admin")) == grpc.StatusCode.OK
    assert code_of(a, "ModelStatistics", stats, bearer("key-ops")) == grpc.StatusCode.OK
    with pytest.raises(grpc.aio.AioRpcError) as e:
        run(call(a, "ModelInfer", infer_request(), bearer("key-admin")))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "lacks the 'infer' scope" in e.value.details()

    async def routing():
        async with AsyncClient(a, api_key="key-app") as client:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.route_get("digits")
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        async with AsyncClient(a, api_key="key-admin") as client:
            await client.route_get("digits")

    run(routing())
    assert metric(gateway, "meshserve_gateway_auth_failures_total",
                  'reason="missing_scope"') == 6


def test_a_task_belongs_to_the_key_that_submitted_it(gateway):
    async def main():
        async with AsyncClient(gateway.address, api_key="key-digits") as mine, \
                AsyncClient(gateway.address, api_key="key-ops") as other:
            task_id = await mine.submit("digits", {"input": X}, idempotency_key="same")
            assert (await mine.get_task(task_id)).task_id == task_id
            for call_ in (other.get_task, other.cancel_task):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call_(task_id)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [_ async for _ in other.watch_task(task_id)]
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            # an idempotency key is the submitter's own: the same one from another key
            # is another task
            theirs = await other.submit("digits", {"input": X}, idempotency_key="same")
            assert theirs != task_id
            assert await mine.submit("digits", {"input": X}, idempotency_key="same") == task_id
            assert (await mine.cancel_task(task_id)).task_id == task_id

    run(main())
