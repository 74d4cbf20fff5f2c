"""python -m meshserve.model_worker: one model worker per device."""

from __future__ import annotations

from meshserve.common import logs
from meshserve.model_worker.config import from_args
from meshserve.model_worker.server import serve


def main(argv: list[str] | None = None) -> None:
    settings = from_args(argv)
    logs.setup(settings.log_level)
    logs.run(serve(settings), "worker")


if __name__ == "__main__":
    main()
