"""A stand-in service for `meshserve up`'s supervision tests, started exactly as up starts a
service (python -m MODULE --host .. --port .. --port-file .. ...).

--mode noisy: writes a 1 MB line without a newline (in pieces), invalid UTF-8, then 20 000
ordinary lines, then its port file, and exits 0 (it can only exit if its output is read).
--mode crash: writes its port file, says why it fails, exits 3.
--mode serve: writes its port file and sleeps until killed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="serve")
    p.add_argument("--port-file")
    p.add_argument("--port", type=int, default=0)
    args, _ = p.parse_known_args()
    out = sys.stdout.buffer
    if args.mode == "noisy":
        for _ in range(16):
            out.write(b"x" * 65536)  # one line of 1 MiB
        out.write(b"\nbad bytes: \xff\xfe\x00 end\n")
        for i in range(20_000):
            out.write(b"line %d\n" % i)
        out.flush()
    if args.mode == "serve":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    ready = {"grpc": args.port or 1, "metrics": None}
    with open(args.port_file + ".tmp", "w") as f:
        json.dump(ready, f)
    os.replace(args.port_file + ".tmp", args.port_file)
    if args.mode == "crash":
        print("fake_service cannot run: RuntimeError: boom", flush=True)
        raise SystemExit(3)
    if args.mode == "serve":
        signal.sigwait({signal.SIGTERM})  # then exits 0, as a service does when drained


if __name__ == "__main__":
    main()
