"""What a newcomer runs: `meshserve up` (what `make run` runs), then the README's client
command, then Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import MODELS, ROOT, free_port

MESHSERVE = [sys.executable, "-m", "meshserve.cli"]


def test_up_then_infer_then_ctrl_c(tmp_path):
    port, http_port = free_port(), free_port()
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen(
        [*MESHSERVE, "up", "--port", str(port), "--metrics-port", "-1", "--devices", "cpu",
         "--http-port", str(http_port)],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "REDIS_URL"},
    )
    try:
        deadline = time.monotonic() + 120
        while b"meshserve is serving" not in (tmp_path / "up.log").read_bytes():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        command = [*MESHSERVE, "infer", "digits", "--url", f"127.0.0.1:{port}",
                   "--input-file", str(MODELS / "digits" / "example.json")]
        first = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert first.returncode == 0, first.stderr
        assert "version 2" in first.stdout and "cache_hit=False" in first.stdout
        assert "predictions int64 [1]:\n[8]" in first.stdout
        # A client command starts fast: it never imports torch.
        timed = subprocess.run([sys.executable, "-X", "importtime", *command[1:]],
                               capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert timed.returncode == 0 and "[8]" in timed.stdout, timed.stderr[-2000:]
        imported = [line.rsplit("|", 1)[-1].strip() for line in timed.stderr.splitlines()
                    if line.startswith("import time:")]
        assert "meshserve.client" in imported
        assert not [m for m in imported if m.split(".")[0] == "torch"]
        for _ in range(50):  # the cache stores after answering
            again = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
            if "cache_hit=True" in again.stdout:
                break
        assert "cache_hit=True" in again.stdout and "[8]" in again.stdout
        bad = subprocess.run([*MESHSERVE, "infer", "digits", "--url", f"127.0.0.1:{port}",
                              "--input", "[1, 2]"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1
        assert "INVALID_ARGUMENT: input 'input': shape [1, 2], expected [-1, 64]" in bad.stderr
        # the curl example it prints works
        [curl] = [line.split("http: ", 1)[1] for line in
                  (tmp_path / "up.log").read_text().splitlines() if "http: curl" in line]
        assert f":{http_port}/" in curl
        metadata = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60)
        assert '"name": "digits"' in metadata.stdout, metadata
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=60)
        log.close()
    output = (tmp_path / "up.log").read_text()
    assert code == 0, output
    for name in ("cache", "worker-0", "batcher", "gateway"):
        assert f"{name:>9} |" in output, f"no log lines from {name}"
    assert output.rstrip().endswith("stopped")
