"""Test certificates from deploy/tls/make-dev-certs.sh, and the whole mesh with mTLS between
its services and TLS on the gateway, every service its own process."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import MODELS, ROOT, ServiceProcess

SCRIPT = ROOT / "deploy" / "tls" / "make-dev-certs.sh"


class Certs:
    def __init__(self, folder: Path):
        self.dir = folder
        self.ca, self.cert, self.key = folder / "ca.crt", folder / "tls.crt", folder / "tls.key"
        # External clients: a certificate of the separate client CA.
        self.client_ca = folder / "client-ca.crt"
        self.client_cert, self.client_key = folder / "client.crt", folder / "client.key"

    def service_flags(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]


def make_certs(folder: Path) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (deploy/tls/make-dev-certs.sh needs it)")
    subprocess.run(["bash", str(SCRIPT), str(folder)], check=True, capture_output=True,
                   timeout=60)
    return Certs(folder)


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


class TlsMesh:
    """cache, worker, batcher and gateway: mTLS on every internal hop (client certificates
    required), TLS on the gateway (client certificates not asked for)."""

    def __init__(self, tmp: Path, certs: Certs):
        tls = certs.service_flags()
        internal = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", *tls]
        self.cache = ServiceProcess("cache", internal, tmp)
        self.worker = ServiceProcess("model_worker", [
            *internal, "--device", "cpu", "--model-repository", str(MODELS)], tmp)
        self.cache.wait_ready()
        self.worker.wait_ready()
        self.batcher = ServiceProcess("batcher", [
            *internal, "--model-repository", str(MODELS), "--load", "digits",
            "--workers", self.worker.address], tmp)
        self.batcher.wait_ready()
        self.gateway = ServiceProcess("gateway", [
            *internal, "--model-repository", str(MODELS), "--batcher", self.batcher.address,
            "--cache", self.cache.address], tmp)
        self.gateway.wait_ready()

    def stop(self) -> None:
        for proc in (self.gateway, self.batcher, self.worker, self.cache):
            proc.stop()


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory, certs):
    mesh = TlsMesh(tmp_path_factory.mktemp("tls-mesh"), certs)
    yield mesh
    mesh.stop()
