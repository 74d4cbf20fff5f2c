"""What the manifests do for security (issue 19): pods bind their IP explicitly (the
services default to 127.0.0.1), gateways start with keys."""

from __future__ import annotations

import pytest

from tests.deploy.test_manifests import TARGETS, TIERS, rendered, settings  # noqa: F401


@pytest.mark.parametrize("target", TARGETS)
def test_pods_bind_their_ip_and_gateways_need_keys(rendered, target):  # noqa: F811
    for tier in TIERS:
        assert settings(rendered, target, tier).get("MESHSERVE_HOST") == "0.0.0.0", tier
    gateway = settings(rendered, target, "gateway")
    assert gateway.get("MESHSERVE_API_KEYS_FILE") or gateway.get("MESHSERVE_INSECURE") == "true"
