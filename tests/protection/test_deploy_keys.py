"""The overlays turn API keys on: the gateway mounts the Secret, its settings point at the
file, and the placeholder file is one the gateway accepts (and no known key opens)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from meshserve.common import auth

yaml = pytest.importorskip("yaml")
K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlay_mounts_the_keys_secret_into_the_gateway(overlay, tmp_path):
    if shutil.which("kubectl") is None:
        pytest.skip("needs kubectl")
    text = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], check=True,
                          capture_output=True, text=True, timeout=120).stdout
    docs = [d for d in yaml.safe_load_all(text) if d]
    secret = next(d for d in docs if d["kind"] == "Secret")
    gateway = next(d for d in docs if d["kind"] == "Deployment"
                   and d["metadata"]["name"] == "meshserve-gateway")
    spec = gateway["spec"]["template"]["spec"]
    container = spec["containers"][0]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"]
                  == container["envFrom"][0]["configMapRef"]["name"])
    path = Path(config["data"]["MESHSERVE_API_KEYS_FILE"])
    volume = next(v for v in spec["volumes"] if v.get("secret", {}).get("secretName")
                  == secret["metadata"]["name"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert path.parent == Path(mount["mountPath"]) and mount["readOnly"] is True
    assert "subPath" not in mount  # a subPath mount would never see the Secret change
    local = tmp_path / path.name
    local.write_text(secret["stringData"][path.name])
    keys = auth.load_keys(local)
    assert [k.name for k in keys.by_hash.values()] == ["replace-me"]
    assert keys.lookup("replace-me") is None and keys.lookup("") is None
