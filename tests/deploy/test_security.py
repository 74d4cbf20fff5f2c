"""What the manifests do for security (issue 19): pods bind their IP explicitly (the
services default to 127.0.0.1), gateways start with keys, no usable secret ships in them."""

from __future__ import annotations

import pytest

from tests.deploy.test_manifests import TARGETS, TIERS, rendered, settings  # noqa: F401


@pytest.mark.parametrize("target", TARGETS)
def test_pods_bind_their_ip_and_gateways_need_keys(rendered, target):  # noqa: F811
    for tier in TIERS:
        assert settings(rendered, target, tier).get("MESHSERVE_HOST") == "0.0.0.0", tier
    gateway = settings(rendered, target, "gateway")
    assert gateway.get("MESHSERVE_API_KEYS_FILE") or gateway.get("MESHSERVE_INSECURE") == "true"


def _egress(policies: list[dict], tier: str) -> set[str]:
    """What `tier` pods may call: "dns", "<tier>:<port>"; "any" for an open rule."""
    out: set[str] = set()
    for policy in policies:
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if selector != {"app.kubernetes.io/name": f"meshserve-{tier}"}:
            continue
        assert "Egress" in policy["spec"]["policyTypes"], policy["metadata"]["name"]
        for rule in policy["spec"].get("egress", []):
            if "to" not in rule:
                out.add("any")
            for peer in rule.get("to", []):
                labels = peer.get("podSelector", {}).get("matchLabels", {})
                if labels.get("k8s-app") == "kube-dns":
                    out.add("dns")
                    continue
                assert "namespaceSelector" not in peer and "ipBlock" not in peer, peer
                name = labels["app.kubernetes.io/name"].removeprefix("meshserve-")
                out |= {f"{name}:{p['port']}" for p in rule["ports"]}
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_every_tier_has_an_egress_policy(rendered, target):  # noqa: F811
    """Egress is denied by default; each tier may call exactly its downstream tiers (the
    workers, which run repository TorchScript, nothing at all)."""
    policies = [o for o in rendered[target][1] if o["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert len(deny) == 1 and "Egress" in deny[0]["spec"]["policyTypes"]
    assert "egress" not in deny[0]["spec"]
    expected = {
        "gateway": {"dns", "batcher:8011", "cache:8031", "state:6379"},
        "batcher": {"dns", "worker:8021", "state:6379"},
        "cache": {"dns", "redis:6379"},
        "worker": set(),
        "redis": set(),
        "state": set(),
    }
    if target == "all":
        expected["async-runner"] = {"dns", "batcher:8011", "cache:8031", "state:6379"}
    for tier, allowed in expected.items():
        assert _egress(policies, tier) == allowed, tier


@pytest.mark.parametrize("target", TARGETS)
def test_the_gateway_is_reachable_from_one_namespace_only(rendered, target):  # noqa: F811
    policy = next(o for o in rendered[target][1] if o["kind"] == "NetworkPolicy"
                  and o["metadata"]["name"] == "meshserve-gateway")
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a gateway port open to every namespace"
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"}


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_in_the_manifests_holds_a_usable_credential(rendered, target):  # noqa: F811
    """The state Redis's password is a Secret the operator creates (none in the manifests,
    so no default anyone could read here); every reference to it is required (a pod without
    it does not start rather than run without a password); the API keys Secret holds hashes
    of no known key only."""
    secrets = [o for o in rendered[target][1] if o["kind"] == "Secret"]
    assert [s["metadata"]["name"] for s in secrets] == ["meshserve-api-keys"]
    for secret in secrets:
        for value in {**secret.get("stringData", {}), **secret.get("data", {})}.values():
            assert "password" not in value.lower() and "REPLACE" not in value
    references = [e["valueFrom"]["secretKeyRef"] for workload in rendered[target][1]
                  if workload["kind"] in ("Deployment", "StatefulSet")
                  for c in workload["spec"]["template"]["spec"]["containers"]
                  for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    assert references and all(r["name"] == "meshserve-state-redis" and not r.get("optional")
                              for r in references)
