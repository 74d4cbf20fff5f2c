"""Protection over HTTP: the same keys, scopes, rate limits and shedding as on the gRPC port
(the HTTP routes go through the same interceptor), answered as 401 / 403 / 429 with
Retry-After; health stays open."""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from tests.protection.conftest import X, metric, write_keys

FULL = {"name": "ops", "key": "key-ops", "models": ["*"]}
DIGITS = {"name": "team-digits", "key": "key-digits", "models": ["digits"]}
OTHER = {"name": "team-other", "key": "key-other", "models": ["other"]}
INFER_ONLY = {"name": "app", "key": "key-app", "models": ["*"], "scopes": ["infer"]}
SLOW = {"name": "slow", "key": "key-slow", "models": ["*"], "rate_per_s": 0.2, "burst": 2}
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                               "data": X.ravel().tolist()}],
                   "parameters": {"cache": False}}).encode()


def call(gateway, method: str, path: str, key: str | None = None, body: bytes | None = None,
         auth: str | None = None):
    headers = {"Authorization": auth or f"Bearer {key}"} if (key or auth) else {}
    conn = http.client.HTTPConnection("127.0.0.1", gateway.ports["http"], timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        return r.status, dict(r.getheaders()), json.loads(raw) if raw else None
    finally:
        conn.close()


@pytest.fixture
def gateway(start_gateway, tmp_path):
    keys = tmp_path / "keys.json"
    write_keys(keys, FULL, DIGITS, OTHER, INFER_ONLY, SLOW)
    return start_gateway("--api-keys-file", str(keys))


def test_keys_scopes_and_models_over_http(gateway):
    infer = "/v2/models/digits/infer"
    assert call(gateway, "POST", infer, body=BODY)[0] == 401
    # refused from the headers alone: a body is never parsed for a caller without a key
    status, _, doc = call(gateway, "POST", infer, body=b"{not json")
    assert status == 401 and "authorization" in doc["error"]
    status, _, doc = call(gateway, "POST", infer, "nope", BODY)
    assert status == 401 and doc == {"error": "unknown API key"}
    assert call(gateway, "POST", infer, body=BODY, auth="Basic a2V5")[0] == 401
    status, _, doc = call(gateway, "POST", infer, "key-other", BODY)
    assert status == 403 and "may not use model 'digits'" in doc["error"]
    status, _, doc = call(gateway, "POST", infer, "key-digits", BODY)
    assert status == 200 and doc["outputs"]
    # management: the models they name and the scope they need, as on gRPC
    assert call(gateway, "GET", "/v2/models/digits")[0] == 401
    assert call(gateway, "GET", "/v2/models/digits", "key-other")[0] == 403
    assert call(gateway, "GET", "/v2/models/digits/config", "key-digits")[0] == 200
    assert call(gateway, "GET", "/v2", "key-app")[0] == 200
    status, _, doc = call(gateway, "POST", "/v2/repository/models/digits/load", "key-app")
    assert status == 403 and "lacks the 'admin' scope" in doc["error"]
    assert call(gateway, "POST", "/v2/repository/models/digits/load", "key-ops")[0] == 200
    # health stays open (Kubernetes probes carry no key)
    assert call(gateway, "GET", "/v2/health/live")[0] == 200
    assert call(gateway, "GET", "/v2/health/ready") == (200, call(gateway, "GET",
                                                         "/v2/health/ready")[1], {"ready": True})


def test_tritonclient_http_sends_the_key_as_headers(gateway):
    client = th.InferenceServerClient(f"127.0.0.1:{gateway.ports['http']}")
    try:
        inp = th.InferInput("input", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        result = client.infer("digits", [inp], headers={"Authorization": "Bearer key-digits"})
        assert result.as_numpy("predictions").shape == (1,)
        with pytest.raises(InferenceServerException) as e:
            client.infer("digits", [inp])
        assert e.value.status() == "401"
    finally:
        client.close()


def test_rate_limit_is_429_with_retry_after(gateway):
    answers = [call(gateway, "POST", "/v2/models/digits/infer", "key-slow", BODY)
               for _ in range(4)]
    codes = [a[0] for a in answers]
    assert codes[:2] == [200, 200] and 429 in codes[2:], codes
    status, headers, doc = next(a for a in answers if a[0] == 429)
    retry = int(headers["Retry-After"])
    assert 1 <= retry <= 5 and "rate limit of API key 'slow' exceeded" in doc["error"]


def test_a_models_rate_is_429_with_retry_after(start_gateway):
    g = start_gateway("--model-rate-limits", "digits=0.1:1")
    assert call(g, "POST", "/v2/models/digits/infer", body=BODY)[0] == 200
    status, headers, doc = call(g, "POST", "/v2/models/digits/infer", body=BODY)
    assert status == 429 and int(headers["Retry-After"]) >= 1 and "the model" in doc["error"]


def test_past_the_concurrency_limit_http_requests_are_shed(start_gateway):
    """The same counter as gRPC's (one Protection): 429 at once past it, 0 in flight after."""
    g = start_gateway("--max-concurrent-requests", "1")
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: call(g, "POST", "/v2/models/digits/infer", body=BODY),
                                range(64)))
    codes = [a[0] for a in answers]
    assert set(codes) == {200, 429}, codes
    for status, _, doc in answers:
        if status == 429:
            assert "1 requests in progress" in doc["error"]
    assert metric(g, "meshserve_gateway_rate_limited_total", 'scope="concurrency"') == codes.count(429)
    assert metric(g, "meshserve_gateway_inflight_requests") == 0
