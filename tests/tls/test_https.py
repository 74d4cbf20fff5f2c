"""The gateway's HTTP port speaks TLS with the gRPC port's certificate: tritonclient.http
over https with the CA, and a plaintext request is not answered as HTTP."""

from __future__ import annotations

import http.client
import json
import ssl

import numpy as np
import pytest
import tritonclient.http as th


def test_https_with_the_gateways_certificate(tls_mesh, certs):
    port = tls_mesh.gateway.ports["http"]
    context = ssl.create_default_context(cafile=str(certs.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    conn.request("GET", "/v2/health/ready")
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read()) == {"ready": True}
    conn.close()
    client = th.InferenceServerClient(f"127.0.0.1:{port}", ssl=True,
                                      ssl_options={"ca_certs": str(certs.ca)})
    try:
        x = (np.arange(64, dtype=np.float32) % 16).reshape(1, 64)
        inp = th.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(x)
        assert client.infer("digits", [inp]).as_numpy("predictions").shape == (1,)
    finally:
        client.close()
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.request("GET", "/v2/health/live")
        plain.getresponse()
    plain.close()
