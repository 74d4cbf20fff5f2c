"""Fixtures of the hostile-caller tests: the protection layer's backend (a worker and a
batcher per module) and gateways started per test."""

from tests.protection.conftest import backend, start_gateway  # noqa: F401 - fixtures
