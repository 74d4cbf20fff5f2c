"""python -m meshserve.tasks (`meshserve async-runner`): runs async inference tasks."""

from meshserve.common import logs
from meshserve.gateway.async_runner import serve
from meshserve.tasks.config import from_args


def main(argv: list[str] | None = None) -> None:
    settings = from_args(argv)
    logs.setup(settings.log_level)
    logs.run(serve(settings), "async-runner")


if __name__ == "__main__":
    main()
