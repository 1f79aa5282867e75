"""Real services for tests, started through `cdpflow stack`'s own code and stopped afterwards.

Registered in tests/conftest.py (`pytest_plugins`), so any test module can ask for them:

    def test_something(redis_url):      # redis://127.0.0.1:PORT/0 of a Redis started for the session
        ...

Each service gets a free port (never the default, so a developer's own Redis on 6379 is left
alone) and a temporary stack folder. The programs are installed by `make test`; a missing one
fails the tests that need it rather than skipping them.
"""
from __future__ import annotations

import shutil
import socket

import pytest

from cdpflow.stack.redis import Redis


def free_port() -> int:
    """A port nothing on 127.0.0.1 listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def require(program: str) -> None:
    if shutil.which(program) is None:
        pytest.fail(f"{program} is not installed: run `make test`, which installs it before the suite")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """The URL of a Redis (AOF on, 127.0.0.1 only) that lives for the test session."""
    require(Redis.program)
    redis = Redis(tmp_path_factory.mktemp("stack"), port=free_port())
    redis.up()
    try:
        yield redis.url()
    finally:
        redis.down()
