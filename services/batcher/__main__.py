"""python -m meshserve.batcher"""

import sys

from meshserve.batcher import config
from meshserve.batcher.server import serve
from meshserve.common import logs


def main(argv: list[str] | None = None) -> None:
    try:
        settings = config.from_args(argv)
    except ValueError as e:
        sys.exit(f"meshserve.batcher: {e}")
    logs.setup(settings.log_level)
    logs.run(serve(settings), "batcher")


if __name__ == "__main__":
    main()
