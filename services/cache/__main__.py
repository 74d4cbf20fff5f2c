"""python -m meshserve.cache: the prediction cache service."""

from __future__ import annotations

from meshserve.cache.config import from_args
from meshserve.cache.server import serve
from meshserve.common import logs


def main(argv: list[str] | None = None) -> None:
    settings = from_args(argv)
    logs.setup(settings.log_level)
    logs.run(serve(settings), "cache")


if __name__ == "__main__":
    main()
