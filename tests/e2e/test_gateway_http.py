"""The v2 API over HTTP/JSON end to end: Triton's HTTP client (JSON and binary tensors),
the same answers as over gRPC from the same gateway, every error status, compression,
the README's curl examples. Every service its own process, a real Redis."""

from __future__ import annotations

import gzip
import http.client
import json
import re
import socket
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from tests.conftest import ServiceProcess
from tests.e2e.test_gateway_triton import ROWS, direct

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = ("logits", "probabilities", "predictions")


@pytest.fixture(scope="module")
def hc(mesh):
    c = th.InferenceServerClient(mesh.gateway.http_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def gc(mesh):
    c = tg.InferenceServerClient(mesh.url)
    yield c
    c.close()


def request(mesh, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", mesh.gateway.ports["http"], timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def infer_json(mesh, body: dict | bytes, path="/v2/models/digits/infer", headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, h, raw = request(mesh, "POST", path, data,
                             {"Content-Type": "application/json", **(headers or {})})
    return status, h, json.loads(raw) if raw else None


def same(http_json, grpc_message) -> bool:
    """The HTTP answer parsed into the gRPC message type equals the gRPC answer."""
    return json_format.ParseDict(http_json, type(grpc_message)()) == grpc_message


def http_input(x: np.ndarray, binary: bool) -> th.InferInput:
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def grpc_outputs(gc, x, version="") -> dict[str, np.ndarray]:
    inp = tg.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    r = gc.infer("digits", [inp], model_version=version, parameters={"cache": False})
    return {n: r.as_numpy(n) for n in OUTPUTS}


# ------------------------------------------------------------------ health, metadata


def test_health_metadata_config_index_match_grpc(mesh, hc, gc):
    assert hc.is_server_live() and hc.is_server_ready()
    assert hc.is_model_ready("digits") and hc.is_model_ready("digits", "1")
    assert same(hc.get_server_metadata(), gc.get_server_metadata())
    for version in ("", "1", "2"):
        assert same(hc.get_model_metadata("digits", version), gc.get_model_metadata("digits", version))
        assert same(hc.get_model_config("digits", version), gc.get_model_config("digits", version).config)
    meta = hc.get_model_metadata("digits")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert hc.get_model_config("digits")["max_batch_size"] == 64  # a number, as Triton writes it
    index = hc.get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} >= {
        ("digits", "1", "READY"), ("digits", "2", "READY")}
    assert same({"models": index}, gc.get_model_repository_index())
    status, _, body = request(mesh, "GET", "/v2/health/ready")
    assert status == 200 and json.loads(body) == {"ready": True}


def test_statistics_match_grpc_and_count_http_inferences(hc, gc):
    before = hc.get_inference_statistics("digits", "2")
    hc.infer("digits", [http_input(ROWS, True)], parameters={"cache": False})
    after = hc.get_inference_statistics("digits", "2")
    assert after["model_stats"][0]["inference_count"] == \
        before["model_stats"][0]["inference_count"] + len(ROWS)
    assert same(after, gc.get_inference_statistics("digits", "2"))
    assert same(hc.get_inference_statistics(), gc.get_inference_statistics())  # every model


# ------------------------------------------------------------------------- inference


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("version", ["", "1"])
def test_infer_same_answers_as_grpc(hc, gc, binary, version):
    outputs = [th.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
    r = hc.infer("digits", [http_input(ROWS, binary)], model_version=version, outputs=outputs,
                 parameters={"cache": False}, request_id="r-7")
    expected = grpc_outputs(gc, ROWS, version)
    for name in OUTPUTS:
        got = r.as_numpy(name)
        assert got.dtype == expected[name].dtype and got.shape == expected[name].shape
        np.testing.assert_array_equal(got, expected[name])  # JSON floats round-trip exactly
    response = r.get_response()
    assert response["id"] == "r-7" and response["model_version"] == (version or "2")
    assert response["parameters"]["served_by"] == f"digits:{version or '2'}"
    np.testing.assert_array_equal(r.as_numpy("predictions"),
                                  direct(version or "2", ROWS)["predictions"])


def test_outputs_default_to_binary_and_mixed_modes(hc):
    # no outputs named: tritonclient asks for every output in binary (binary_data_output)
    r = hc.infer("digits", [http_input(ROWS, False)])
    assert all("binary_data_size" in o["parameters"] for o in r.get_response()["outputs"])
    np.testing.assert_array_equal(r.as_numpy("predictions"), direct("2", ROWS)["predictions"])
    r = hc.infer("digits", [http_input(ROWS, True)], outputs=[
        th.InferRequestedOutput("predictions", binary_data=False),
        th.InferRequestedOutput("probabilities", binary_data=True)])
    outs = {o["name"]: o for o in r.get_response()["outputs"]}
    assert list(outs) == ["predictions", "probabilities"]
    assert outs["predictions"]["data"] == direct("2", ROWS)["predictions"].tolist()
    assert outs["probabilities"]["parameters"]["binary_data_size"] == 4 * 10 * len(ROWS)


def test_plain_json_nested_data_and_parameters(mesh):
    body = {"id": "a", "inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32",
                                   "data": ROWS.tolist()}],  # nested
            "outputs": [{"name": "predictions"}], "parameters": {"cache": False, "priority": 1}}
    status, headers, doc = infer_json(mesh, body)
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert doc["outputs"] == [{"name": "predictions", "datatype": "INT64", "shape": [3],
                               "data": direct("2", ROWS)["predictions"].tolist()}]
    assert doc["parameters"]["cache_hit"] is False and doc["id"] == "a"


def test_compressed_requests_and_responses(hc, mesh):
    for algorithm in ("gzip", "deflate"):
        r = hc.infer("digits", [http_input(ROWS, True)], request_compression_algorithm=algorithm,
                     response_compression_algorithm=algorithm)
        np.testing.assert_array_equal(r.as_numpy("predictions"), direct("2", ROWS)["predictions"])
    body = json.dumps({"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32",
                                   "data": ROWS.ravel().tolist()}]}).encode()
    status, headers, raw = request(mesh, "POST", "/v2/models/digits/infer", gzip.compress(body),
                                   {"Content-Encoding": "gzip", "Accept-Encoding": "deflate"})
    assert status == 200 and headers["content-encoding"] == "deflate"
    assert len(json.loads(zlib.decompress(raw))["outputs"]) == 3
    # a body that is not what its Content-Encoding says: 400, and no traceback in the log
    status, _, raw = request(mesh, "POST", "/v2/models/digits/infer", b"not gzip",
                             {"Content-Encoding": "gzip"})
    assert status == 400 and "cannot be read" in json.loads(raw)["error"]
    status, _, raw = request(mesh, "POST", "/v2/models/digits/infer", body,
                             {"Content-Encoding": "zstdx"})
    assert status == 415 and "'zstdx' is not supported" in json.loads(raw)["error"]
    assert "Traceback" not in mesh.gateway.output()


# ---------------------------------------------------------------------- repository


def test_unload_then_503_then_load(hc):
    hc.unload_model("digits")
    assert not hc.is_model_ready("digits")
    with pytest.raises(InferenceServerException) as e:
        hc.infer("digits", [http_input(ROWS, True)], parameters={"cache": False})
    assert e.value.status() == "503"
    states = {(m["name"], m["version"]): m["state"] for m in hc.get_model_repository_index()}
    assert states[("digits", "2")] == "UNAVAILABLE"
    hc.load_model("digits")
    assert hc.is_model_ready("digits", "1") and hc.is_model_ready("digits", "2")
    r = hc.infer("digits", [http_input(ROWS, True)], parameters={"cache": False})
    np.testing.assert_array_equal(r.as_numpy("predictions"), direct("2", ROWS)["predictions"])


def test_load_with_parameters_and_refusals(mesh, hc):
    status, _, body = request(mesh, "POST", "/v2/repository/models/digits/load",
                              json.dumps({"parameters": {"versions": "1,2"}}).encode())
    assert status == 200 and body == b""
    for name, code in (("no_such_model", "404"), ("..", "400")):
        with pytest.raises(InferenceServerException) as e:
            hc.load_model(name)
        assert e.value.status() == code
    with pytest.raises(InferenceServerException) as e:
        hc.load_model("digits", config='{"max_batch_size": 1}')
    assert e.value.status() == "400" and "not supported" in e.value.message()


# -------------------------------------------------------------------------- errors


X1 = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v2/models/nope/infer", {"inputs": [X1]}, 404, "unknown model 'nope'"),
        ("/v2/models/digits/versions/9/infer", {"inputs": [X1]}, 404, "no version '9'"),
        ("/v2/models/digits/infer", b'{"inputs": [', 400, "malformed JSON at line 1 column 13"),
        ("/v2/models/digits/infer", b'[1]', 400, "must be a JSON object"),
        ("/v2/models/digits/infer", {}, 400, "inputs: expected a non-empty array"),
        ("/v2/models/digits/infer", {"inputs": [{**X1, "shape": [2, 64]}]}, 400,
         "inputs[0].data: 64 values, expected 128"),
        ("/v2/models/digits/infer", {"inputs": [{**X1, "shape": [1, "a"]}]}, 400,
         "inputs[0].shape: expected an array of non-negative integers"),
        ("/v2/models/digits/infer", {"inputs": [{**X1, "datatype": "FP99"}]}, 400,
         "inputs[0].datatype: 'FP99' is not a v2 datatype"),
        ("/v2/models/digits/infer", {"inputs": [{**X1, "data": ["x"] * 64}]}, 400,
         "inputs[0].data: FP32 values must be numbers"),
        ("/v2/models/digits/infer", {"inputs": [{**X1, "data": [[1, 2], [3]]}]}, 400,
         "inputs[0].data: not a regular array"),
        ("/v2/models/digits/infer", {"inputs": [{**X1, "datatype": "FP64"}]}, 400,
         "datatype FP64, expected FP32"),
        ("/v2/models/digits/infer", {"inputs": [{**X1, "shape": [1, 32], "data": [0] * 32}]}, 400,
         "shape [1, 32], expected [-1, 64]"),
        ("/v2/models/digits/infer", {"inputs": [X1], "outputs": [{"name": "nope"}]}, 400,
         "unknown requested output 'nope'"),
        ("/v2/models/digits/infer", {"inputs": [X1], "parameters": {"priority": 7}}, 400,
         "priority 7 is out of range"),
        ("/v2/models/digits/infer", {"inputs": [X1], "parameters": {"priority": [1]}}, 400,
         "parameters.'priority': expected a bool, number or string"),
        ("/v2/models/digits/infer", {"inputs": [X1], "parameters": {"timeout": 1, "cache": False}},
         504, ""),
    ],
)
def test_error_statuses(mesh, path, body, status, fragment):
    got, headers, doc = infer_json(mesh, body, path)
    assert got == status, doc
    assert headers["content-type"].startswith("application/json")
    assert set(doc) == {"error"} and fragment in doc["error"]


def test_binary_extension_errors(mesh):
    x = np.zeros((1, 64), np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 256}}]}).encode()
    for length, tail, fragment in (
            (len(header), x + b"extra", "5 bytes of binary data after the inputs"),
            (len(header), x[:100], "overrun the 100 bytes of binary data"),
            (len(header) + len(x) + 1, x, "is not within the body"),
            ("ten", x, "'ten' is not an integer")):
        status, _, doc = infer_json(mesh, header + tail,
                                    headers={"Inference-Header-Content-Length": str(length)})
        assert status == 400 and fragment in doc["error"], doc
    status, _, doc = infer_json(mesh, header + x, headers={"Inference-Header-Content-Length":
                                                           str(len(header))})
    assert status == 200 and doc["outputs"][2]["data"] == [int(direct("2", np.zeros(
        (1, 64), np.float32))["predictions"][0])]


def test_unknown_routes_and_methods(mesh):
    status, _, body = request(mesh, "GET", "/v2/nothing")
    assert status == 404 and "error" in json.loads(body)
    status, _, body = request(mesh, "GET", "/v2/models/digits/infer")
    assert status == 405 and "method GET" in json.loads(body)["error"]
    status, _, body = request(mesh, "GET", "/v2/models/nope")
    assert status == 404 and "unknown model 'nope'" in json.loads(body)["error"]
    status, _, body = request(mesh, "GET", "/v2/models/nope/ready")
    assert status == 404


def test_openapi_document_is_served(mesh):
    status, _, body = request(mesh, "GET", "/v2/openapi.json")
    served = json.loads(body)
    assert status == 200
    assert served == json.loads((ROOT / "services" / "gateway" / "openapi.json").read_text())


# ---------------------------------------------------------------- size limit (413)


@pytest.fixture(scope="module")
def small_gateway(mesh, tmp_path_factory):
    g = ServiceProcess("gateway", [
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--max-message-mb", "1",
        "--model-repository", str(ROOT / "models"), "--batcher", mesh.batcher.address],
        tmp_path_factory.mktemp("small"))
    g.wait_ready()
    yield g
    g.stop()


def _send_head(port: int, headers: str, first: bytes) -> bytes:
    """Sends the request head and the start of a body, then reads the answer: a server
    that waited for the whole body would never answer (the socket times out)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(headers.encode() + b"\r\n" + first)
        data = b""
        while b"\r\n\r\n" not in data or not re.search(rb'"error"[^}]*}', data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_413_by_content_length_before_the_body(small_gateway):
    port = small_gateway.ports["http"]
    answer = _send_head(port, "POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                        f"Content-Length: {64 * 2**20}\r\nContent-Type: application/json\r\n",
                        b'{"inputs": [')
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"over the limit of 1048576 bytes" in answer


def test_413_for_a_chunked_or_compressed_body_past_the_limit(small_gateway):
    port = small_gateway.ports["http"]
    chunk = b"0" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20))  # 1.25 MiB
    answer = _send_head(port, "POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                        "Transfer-Encoding: chunked\r\n", body)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    bomb = gzip.compress(b" " * (8 * 2**20))  # 8 MiB of spaces in a few KiB
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v2/models/digits/infer", bomb, {"Content-Encoding": "gzip"})
    r = conn.getresponse()
    assert r.status == 413 and "over the limit" in json.loads(r.read())["error"]
    conn.close()


# ------------------------------------------------------------------- README curl


def test_readme_curl_examples(mesh):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## HTTP and JSON", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = [c for b in blocks for c in re.split(r"\n(?=curl)", b.strip()) if "curl" in c]
    assert len(commands) >= 4
    port = mesh.gateway.ports["http"]
    outputs = []
    for command in commands:
        command = command.replace("localhost:8000", f"127.0.0.1:{port}")
        done = subprocess.run(["bash", "-c", command + " --fail-with-body"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        outputs.append(json.loads(done.stdout))
    infer = [o for o in outputs if isinstance(o, dict) and "model_name" in o]
    assert infer and infer[0]["outputs"][0]["data"] == [8]  # the example is an 8


def test_variable_length_model_over_http(mesh, hc, gc):
    """models/seqpool (FP32 [-1, -1, 4]): loaded over HTTP, nested JSON and binary inputs of
    two lengths, the same answers as gRPC."""
    hc.load_model("seqpool")
    assert hc.is_model_ready("seqpool")
    example = json.loads((ROOT / "models" / "seqpool" / "example.json").read_text())["tokens"]
    for x in (np.array(example, dtype=np.float32),
              np.random.default_rng(3).random((2, 5, 4), dtype=np.float32)):
        body = {"inputs": [{"name": "tokens", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.tolist()}], "parameters": {"cache": False}}
        status, _, doc = infer_json(mesh, body, "/v2/models/seqpool/infer")
        assert status == 200, doc
        inp = tg.InferInput("tokens", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        expected = gc.infer("seqpool", [inp], parameters={"cache": False}).as_numpy("pooled")
        [out] = doc["outputs"]
        assert out["shape"] == list(expected.shape)
        np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(expected.shape),
                                      expected)
        binary = th.InferInput("tokens", list(x.shape), "FP32")
        binary.set_data_from_numpy(x, binary_data=True)
        np.testing.assert_array_equal(hc.infer("seqpool", [binary]).as_numpy("pooled"), expected)
