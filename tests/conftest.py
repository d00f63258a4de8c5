"""Shared fixtures: real services started once per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from services import InfluxServer


@pytest.fixture(scope="session")
def influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    """InfluxDB 1.6.7 (Debian) on private ports, stopped by PID at the end of the session."""
    server = InfluxServer(tmp_path_factory.mktemp("influxdb"))
    server.start()
    yield server
    server.stop()
