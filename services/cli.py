"""The `meshserve` command.

    meshserve up                       the whole mesh on this machine (what `make run` runs)
    meshserve gateway|batcher|worker|cache [flags]
                                       one service alone (how Kubernetes runs them)
    meshserve infer MODEL --input ...  one inference against a gateway
    meshserve submit MODEL --input-file F   queue an async inference (prints the task id)
    meshserve result TASK_ID [--wait]  an async task's state and result
    meshserve async-runner [flags]     runs async tasks from Redis (beside the gateways)
    meshserve route get|set|promote|watch MODEL ...
                                       traffic management: splits, canaries, shadows, fallback
    meshserve keys add NAME --models digits,... --file keys.json
                                       API keys for --api-keys-file (prints the key once)
"""

from __future__ import annotations

import importlib
import sys

SERVICES = {
    "gateway": "meshserve.gateway.__main__",
    "batcher": "meshserve.batcher.__main__",
    "worker": "meshserve.model_worker.__main__",
    "cache": "meshserve.cache.__main__",
    "async-runner": "meshserve.tasks.__main__",
}
# meshserve.client.commands.COMMANDS (not imported here: `meshserve gateway` needs no client)
CLIENT_COMMANDS = ("infer", "submit", "result", "route")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command in SERVICES:
        importlib.import_module(SERVICES[command]).main(rest)
    elif command == "up":
        from meshserve import local_mesh

        raise SystemExit(local_mesh.main(rest))
    elif command in CLIENT_COMMANDS:
        from meshserve.client import commands

        raise SystemExit(commands.main(command, rest))
    elif command == "keys":
        from meshserve.common import auth

        raise SystemExit(auth.keys_main(rest))
    else:
        print(f"meshserve: unknown command {command!r}\n\n{__doc__.strip()}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
