"""deploy/k8s/components/mtls rendered over the CPU overlay (tests/tls/k8s-mtls): every
meshserve pod mounts its own tier's TLS Secret, every service is pointed at it and serves
only the tiers that call it, and no probe is left that would speak plaintext to a TLS port."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the dev extra")

HERE = Path(__file__).resolve().parent
TIERS = {"gateway": 8001, "batcher": 8011, "worker": 8021, "cache": 8031}
TLS_DIR = "/etc/meshserve/tls"
# Who may call each internal tier (certificate common names), as in
# tests/security/test_mtls_identity.py, which runs these flags on real processes.
CALLERS = {"batcher": {"meshserve-gateway", "meshserve-async-runner"},
           "worker": {"meshserve-batcher"},
           "cache": {"meshserve-gateway", "meshserve-async-runner"}}


def render(fixture: str) -> list[dict]:
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize"]
    elif shutil.which("kustomize"):
        command = ["kustomize", "build"]
    else:
        pytest.skip("needs kubectl (kustomize built in) or kustomize on the PATH")
    text = subprocess.run([*command, str(HERE / fixture)], check=True, capture_output=True,
                          text=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render("k8s-mtls")


def find(objects, kind: str, name: str) -> dict:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def config_of(objects, deployment: dict) -> dict:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    [ref] = container["envFrom"]
    return find(objects, "ConfigMap", ref["configMapRef"]["name"])["data"]


@pytest.mark.parametrize("tier", TIERS)
def test_every_tier_serves_and_calls_with_the_mounted_certificates(objects, tier):
    deployment = find(objects, "Deployment", f"meshserve-{tier}")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == f"meshserve-tls-{tier}"  # its identity
    [container] = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["tls"]["mountPath"] == TLS_DIR and mounts["tls"]["readOnly"]
    env = config_of(objects, deployment)
    assert env["MESHSERVE_TLS_CERT"] == f"{TLS_DIR}/tls.crt"
    assert env["MESHSERVE_TLS_KEY"] == f"{TLS_DIR}/tls.key"
    assert env["MESHSERVE_TLS_CA"] == f"{TLS_DIR}/ca.crt"
    # mTLS inside; the public gateway does not ask external clients for a certificate.
    assert env["MESHSERVE_TLS_CLIENT_AUTH"] == ("none" if tier == "gateway" else "require")


@pytest.mark.parametrize("tier", TIERS)
def test_no_plaintext_grpc_probe_is_left(objects, tier):
    [container] = find(objects, "Deployment", f"meshserve-{tier}")["spec"]["template"]["spec"][
        "containers"]
    readiness = container["readinessProbe"]
    assert readiness["exec"]["command"] == [
        "python", "-m", "meshserve.common.healthcheck", "--port", str(TIERS[tier]),
        "--server-name", f"meshserve-{tier}"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in container[probe], f"{tier} {probe}"
    service = find(objects, "Service", f"meshserve-{tier}")
    grpc_port = [p for p in service["spec"]["ports"] if p["name"] == "grpc"][0]
    assert "appProtocol" not in grpc_port  # no longer cleartext HTTP/2 (h2c)


def test_the_gateways_http_port_speaks_https(objects):
    [container] = find(objects, "Deployment", "meshserve-gateway")["spec"]["template"]["spec"][
        "containers"]
    assert container["livenessProbe"]["httpGet"] == {
        "path": "/v2/health/live", "port": "http", "scheme": "HTTPS"}
    service = find(objects, "Service", "meshserve-gateway")
    http = [p for p in service["spec"]["ports"] if p["name"] == "http"][0]
    assert http["appProtocol"] == "https"


@pytest.mark.parametrize("tier", TIERS)
def test_each_tier_serves_only_the_tiers_that_call_it(objects, tier):
    env = config_of(objects, find(objects, "Deployment", f"meshserve-{tier}"))
    allowed = env.get("MESHSERVE_TLS_ALLOWED_CLIENTS")
    if tier == "gateway":
        assert allowed is None  # external clients: their own CA, no identity list
    else:
        assert set(allowed.split(",")) == CALLERS[tier]


def callers_let_in(objects, tier: str) -> set[str]:
    policy = find(objects, "NetworkPolicy", f"meshserve-{tier}")
    return {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
            for rule in policy["spec"]["ingress"]
            if any(p["port"] == TIERS[tier] for p in rule.get("ports", []))
            for peer in rule.get("from", []) if "podSelector" in peer}


@pytest.mark.parametrize("tier", CALLERS)
def test_every_caller_the_network_lets_in_is_an_allowed_identity(objects, tier):
    """The NetworkPolicies and the identities agree: a tier let in to a port by the network
    would otherwise be refused by the certificate check (and the mesh would not serve)."""
    callers = callers_let_in(objects, tier)
    assert callers and callers <= CALLERS[tier]


def test_standalone_runners_have_their_own_identity():
    """components/async-runner + mtls + mtls-async-runner (tests/tls/k8s-mtls-runner): the
    runners mount their own Secret, call and serve over mTLS, probe over mTLS, and the
    batchers and caches they reach through the network accept their identity."""
    objects = render("k8s-mtls-runner")
    runner = find(objects, "Deployment", "meshserve-async-runner")
    pod = runner["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["tls"]["secret"]["secretName"] == \
        "meshserve-tls-async-runner"
    [container] = pod["containers"]
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["tls"] == TLS_DIR
    env = config_of(objects, runner)
    assert env["MESHSERVE_TLS_CERT"] == f"{TLS_DIR}/tls.crt"
    assert env["MESHSERVE_TLS_CA"] == f"{TLS_DIR}/ca.crt"
    assert env["MESHSERVE_TLS_CLIENT_AUTH"] == "require"
    assert "grpc" not in container["readinessProbe"]
    assert container["readinessProbe"]["exec"]["command"][-1] == "meshserve-async-runner"
    for tier in ("batcher", "cache"):
        assert "meshserve-async-runner" in callers_let_in(objects, tier)
        assert callers_let_in(objects, tier) <= CALLERS[tier]
