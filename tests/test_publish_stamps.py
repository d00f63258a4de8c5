"""`cellwatch publish` faster than real time never stamps a sample ahead of the clock: data from the
future would sit in InfluxDB ahead of "now" on every dashboard, and a second run soon after would be
dropped by the daemon as duplicates without a word (the command now says when it stamped)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import aiomqtt
import pytest
from brokers import MosquittoServer
from daemons import CELLWATCH
from services import poll

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("speed", ["inf", "40"])
def test_fast_publishing_stamps_no_sample_ahead_of_the_clock(
    speed: str, mosquitto: MosquittoServer, tiny_cell_and_model: tuple[Path, Path]
) -> None:
    cell, _ = tiny_cell_and_model
    prefix = f"stamps{speed}"
    received: list[tuple[int, int]] = []  # (last sample's stamp, wall clock at receipt)

    async def run() -> subprocess.CompletedProcess[str]:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.subscribe(f"{prefix}/+/signals", qos=1)
            command = [str(CELLWATCH), "publish", str(cell), "--to"]
            command += [f"mqtt://127.0.0.1:{mosquitto.port}/{prefix}/+/signals", "--speed", speed]
            command += ["--cycles", "3", "--robots", "2"]
            proc = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )

            async def collect() -> None:
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    body = json.loads(message.payload)
                    rows = len(next(iter(body["signals"].values())))
                    received.append((body["time_ns"] + (rows - 1) * body["period_ns"], time.time_ns()))

            collector = asyncio.create_task(collect())
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            sent = re.search(r"sent (\d+) messages", out.decode())
            if sent:  # QoS 1: everything sent is at the broker; wait until it has all reached us
                await poll(lambda: len(received) >= int(sent.group(1)), 30)
            collector.cancel()
            return subprocess.CompletedProcess(command, proc.returncode or 0, out.decode(), err.decode())

    result = asyncio.run(run())
    assert result.returncode == 0, result.stderr
    assert "samples stamped from" in result.stdout
    assert received
    ahead = [(stamp - now) / 1e9 for stamp, now in received if stamp > now]
    assert not ahead, f"{len(ahead)} messages stamped up to {max(ahead):.1f} s ahead of the clock"
    # and not absurdly far in the past either: the run ends about now
    latest = max(stamp for stamp, _ in received)
    assert time.time_ns() - latest < 60e9
