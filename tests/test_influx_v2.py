"""The InfluxDB sink against a real InfluxDB 2.x (or Cloud/3.x) through the v2 API: token auth,
``POST /api/v2/write``, and the points read back with Flux (``POST /api/v2/query``, annotated CSV).

Not run where this was written: the InfluxDB there is 1.6.7, which has no v2 API, so only the skip
path and the type checks were exercised. To run it, point it at a v2 server and a bucket the token may
read and write (its retention must keep points from the last hour)::

    CELLWATCH_TEST_INFLUX2_URL=http://127.0.0.1:8086 CELLWATCH_TEST_INFLUX2_TOKEN=... \\
    CELLWATCH_TEST_INFLUX2_ORG=my-org CELLWATCH_TEST_INFLUX2_BUCKET=cellwatch-test \\
        .venv/bin/pytest tests/test_influx_v2.py

Each run writes under its own ``robot`` tag, so runs never see each other's points.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
import os
import time
import urllib.parse
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from services import wait_until
from test_influx_sink import T0, expected, points

from daemon.sinks.influx import InfluxSink, InfluxTarget, PermanentWriteError, post
from daemon.sinks.lineprotocol import Point

ENV = "CELLWATCH_TEST_INFLUX2_"
HOW = (
    f"set {ENV}URL, {ENV}TOKEN, {ENV}ORG and {ENV}BUCKET to run it against an InfluxDB 2.x "
    "(see this module's docstring)"
)


@dataclasses.dataclass(frozen=True)
class Influx2:
    url: str
    token: str = dataclasses.field(repr=False)
    org: str
    bucket: str

    def target(self, **changes: Any) -> InfluxTarget:
        target = InfluxTarget(url=self.url, api="v2", org=self.org, bucket=self.bucket, token=self.token)
        return dataclasses.replace(target, **changes)

    def flux(self, query: str) -> list[dict[str, Any]]:
        """Run a Flux query; the rows of every table it returns, typed by the #datatype annotation."""
        body = {
            "query": query,
            "type": "flux",
            "dialect": {"header": True, "annotations": ["datatype"], "delimiter": ","},
        }
        request = urllib.request.Request(
            f"{self.url.rstrip('/')}/api/v2/query?{urllib.parse.urlencode({'org': self.org})}",
            data=json.dumps(body).encode(),
            headers={
                "Authorization": f"Token {self.token}",
                "Content-Type": "application/json",
                "Accept": "application/csv",
            },
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return parse_annotated_csv(response.read().decode())


CONVERT: dict[str, Any] = {
    "long": int,
    "unsignedLong": int,
    "double": float,
    "boolean": lambda v: v == "true",
}


def parse_annotated_csv(text: str) -> list[dict[str, Any]]:
    """Flux's annotated CSV: per table, a #datatype row, a header row, records; tables end at a blank
    line. An error inside a 200 response comes as a table with an ``error`` column."""
    rows: list[dict[str, Any]] = []
    types: list[str] = []
    header: list[str] | None = None
    for record in csv.reader(io.StringIO(text)):
        if not any(record):  # the blank line between tables
            header = None
            continue
        if record[0] == "#datatype":
            types, header = record, None
            continue
        if record[0].startswith("#"):
            continue
        if header is None:
            header = record
            continue
        values = [CONVERT.get(t, str)(v) if v != "" else None for t, v in zip(types, record, strict=False)]
        row = dict(zip(header, values, strict=False))
        if "error" in header:
            raise RuntimeError(f"Flux query failed: {row['error']}")
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def influx2() -> Influx2:
    url = os.environ.get(f"{ENV}URL")
    if not url:
        pytest.skip(f"no InfluxDB 2.x configured: {HOW}")
    missing = [f"{ENV}{k}" for k in ("TOKEN", "ORG", "BUCKET") if not os.environ.get(f"{ENV}{k}")]
    if missing:
        pytest.fail(f"{ENV}URL is set but {', '.join(missing)} not: {HOW}")
    return Influx2(
        url=url,
        token=os.environ[f"{ENV}TOKEN"],
        org=os.environ[f"{ENV}ORG"],
        bucket=os.environ[f"{ENV}BUCKET"],
    )


def rfc3339(seconds: int) -> str:
    """A Flux date-time literal."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def stored(server: Influx2, robot: str, pts: list[Point]) -> list[list[object]]:
    """What the bucket holds for `robot`, as rows of the v1 test's `expected` (plus model and mode)."""
    start = rfc3339(pts[0].time_ns // 10**9)
    stop = rfc3339(pts[-1].time_ns // 10**9 + 1)
    rows = server.flux(
        f"""
        from(bucket: {json.dumps(server.bucket)})
          |> range(start: {start}, stop: {stop})
          |> filter(fn: (r) => r._measurement == "anomaly_score" and r.robot == {json.dumps(robot)})
          |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
          |> map(fn: (r) => ({{r with time_ns: int(v: r._time)}}))
          |> group()
          |> sort(columns: ["time_ns"])
        """
    )
    return [
        [r["time_ns"], r["score"], r["is_anomaly"], r["cycle"], r["robot"], r["model"], r["mode"]]
        for r in rows
    ]


def test_v2_write_reads_back_point_for_point(influx2: Influx2, tmp_path: Path) -> None:
    robot = f"v2-test-{uuid.uuid4().hex[:8]}"
    now = time.time_ns() // 10**9 * 10**9 - 60 * 10**9  # recent: inside any bucket's retention
    pts = [dataclasses.replace(p, time_ns=p.time_ns - T0 + now) for p in points(0, 1200, robot=robot)]

    async def run() -> InfluxSink:
        sink = InfluxSink(influx2.target(), tmp_path / "spool", batch_points=250)
        await sink.start()
        await sink.write(pts)
        assert await sink.close(drain_timeout_s=60), sink.stats.last_error
        return sink

    sink = asyncio.run(run())
    assert (sink.stats.batches_delivered, sink.stats.batches_rejected) == (5, 0), sink.stats.last_error
    wait_until(lambda: len(stored(influx2, robot, pts)) >= len(pts), 30, "the points to be queryable")
    want = [[*row, p.tags["model"], p.tags["mode"]] for row, p in zip(expected(pts), pts, strict=True)]
    assert stored(influx2, robot, pts) == want


def test_v2_bad_token_is_refused_not_retried(influx2: Influx2) -> None:
    line = f"anomaly_score,robot=v2-test-auth score=1 {time.time_ns()}\n".encode()
    with pytest.raises(PermanentWriteError, match="401"):
        post(influx2.target(token="not-a-valid-token"), line)


def test_annotated_csv_reader() -> None:
    """The reader the tests above rely on (runs everywhere: it needs no server)."""
    text = (
        "#datatype,string,long,long,double,boolean,string\r\n"
        ",result,table,time_ns,score,is_anomaly,robot\r\n"
        ',_result,0,1700000000000000000,0.5,true,"cell 1,arm"\r\n'
        ",_result,0,1700000000010000000,,false,r1\r\n"
        "\r\n"
        "#datatype,string,long,long\r\n"
        ",result,table,cycle\r\n"
        ",_result,1,7\r\n"
    )
    assert parse_annotated_csv(text) == [
        {
            "": None,
            "result": "_result",
            "table": 0,
            "time_ns": T0,
            "score": 0.5,
            "is_anomaly": True,
            "robot": "cell 1,arm",
        },
        {
            "": None,
            "result": "_result",
            "table": 0,
            "time_ns": T0 + 10_000_000,
            "score": None,
            "is_anomaly": False,
            "robot": "r1",
        },
        {"": None, "result": "_result", "table": 1, "cycle": 7},
    ]
    with pytest.raises(RuntimeError, match="Flux query failed: type error"):
        parse_annotated_csv("#datatype,string,string\r\n,error,reference\r\n,type error,\r\n")
