"""python -m meshserve.gateway: the public Open Inference Protocol v2 API."""

from meshserve.common import logs
from meshserve.gateway.config import from_args
from meshserve.gateway.server import serve


def main(argv: list[str] | None = None) -> None:
    settings = from_args(argv)
    logs.setup(settings.log_level)
    logs.run(serve(settings), "gateway")


if __name__ == "__main__":
    main()
