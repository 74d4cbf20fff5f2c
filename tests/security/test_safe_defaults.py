"""Safe defaults: services bind loopback unless told otherwise, an open gateway refuses a
public address, secrets stay out of logs, the key can come from the environment."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshserve.batcher import config as batcher_config
from meshserve.cache import config as cache_config
from meshserve.client.commands import COMMANDS, infer_parser
from meshserve.common.errors import ConfigError
from meshserve.common.logs import redact_url
from meshserve.gateway import config as gateway_config
from meshserve.model_worker import config as worker_config
from meshserve.tasks import config as tasks_config
from tests.conftest import free_port


def test_every_service_binds_loopback_by_default():
    assert gateway_config.from_args([]).host == "127.0.0.1"
    assert batcher_config.from_args([]).host == "127.0.0.1"
    assert cache_config.from_args([], env={}).host == "127.0.0.1"
    assert worker_config.from_args(["--device", "cpu"], env={}).host == "127.0.0.1"
    assert tasks_config.from_args(["--redis-url", "redis://127.0.0.1:1/0"]).host == "127.0.0.1"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_an_open_gateway_may_listen_on_loopback(host):
    assert gateway_config.Settings(host=host).host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gateway.example.com"])
def test_an_open_gateway_refuses_a_public_address(host, tmp_path):
    with pytest.raises(ConfigError, match="refusing to serve without API keys"):
        gateway_config.Settings(host=host)
    assert gateway_config.Settings(host=host, insecure=True).insecure
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": []}')
    assert gateway_config.Settings(host=host, api_keys_file=str(keys)).host == host


def test_the_gateway_process_exits_with_the_reason():
    proc = subprocess.run([sys.executable, "-m", "meshserve.gateway", "--host", "0.0.0.0",
                           "--port", str(free_port()), "--metrics-port", "-1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "refusing to serve without API keys" in proc.stderr and "--insecure" in proc.stderr
    assert gateway_config.from_args(["--host", "0.0.0.0", "--insecure"]).insecure


def test_redis_passwords_never_reach_a_log_line(tmp_path):
    assert redact_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("rediss://app:s3cret@redis:6380/1") == "rediss://app:***@redis:6380/1"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"
    assert "s3cret" not in redact_url("unix:///run/redis.sock?db=0&password=s3cret")
    # A runner waiting for a Redis that is not there logs where it waits, not the password.
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    proc = subprocess.Popen([sys.executable, "-m", "meshserve.tasks", "--redis-url", url,
                             "--port", "0", "--metrics-port", "-1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "waiting for the task store" in line:
                break
    finally:
        proc.kill()
        proc.wait()
    text = "".join(seen)
    assert "waiting for the task store at redis://:***@127.0.0.1" in text, text
    assert "s3cret" not in text


def test_the_cli_reads_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("MESHSERVE_API_KEY", "msk_from_env")
    assert infer_parser().parse_args(["digits", "--input", "[1]"]).api_key == "msk_from_env"
    assert infer_parser().parse_args(["digits", "--input", "[1]", "--api-key", "k"]).api_key == "k"
    monkeypatch.delenv("MESHSERVE_API_KEY")
    assert infer_parser().parse_args(["digits", "--input", "[1]"]).api_key == ""


@pytest.mark.parametrize("argv", [
    ["infer", "digits", "--input", "[1]"], ["submit", "digits", "--input-file", "x.json"],
    ["result", "t1"], ["route", "get", "digits"], ["route", "set", "digits", "--split", "1=1"],
])
def test_every_client_command_takes_the_same_connection_flags(monkeypatch, argv):
    monkeypatch.setenv("MESHSERVE_API_KEY", "msk_from_env")
    monkeypatch.setenv("MESHSERVE_URL", "gw:1")
    name, rest = argv[0], argv[1:]
    parse = COMMANDS[name][0]().parse_args
    args = parse(rest)
    assert (args.url, args.api_key, args.tls_ca, args.tls_cert, args.tls_key) == (
        "gw:1", "msk_from_env", "", "", "")
    flags = ["--url", "h:2", "--api-key", "k", "--tls-ca", "ca", "--tls-cert", "c",
             "--tls-key", "k.pem"]
    args = parse(rest + flags)
    assert (args.url, args.api_key, args.tls_ca, args.tls_cert, args.tls_key) == (
        "h:2", "k", "ca", "c", "k.pem")

