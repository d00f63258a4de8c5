"""The Grafana provisioning in dashboards/, against what `cellwatch run` writes into the real InfluxDB.

Grafana itself is not installed here, so the test does what Grafana does with these files: it expands
the datasource's environment variables, interpolates every query the way Grafana's InfluxDB (InfluxQL)
datasource does (``$timeFilter`` as ``time >= <from>ms and time <= <to>ms``, ``$__interval``, ``$robot``
regex-escaped, several robots as ``(a|b)``; ``$camera`` likewise) and runs it against InfluxDB 1.6.7
holding a simulated two-robot cell replayed through the daemon, plus the cameras of the cell: image scores,
camera alerts and fused cycles written with the schema the daemon uses (daemon/layout.py), their
anomaly-map overlays saved by the daemon's OverlayStore and served by its metrics endpoint. Every panel,
template-variable, annotation and alert-rule query must run and return the series that were written, for
the robots and cameras selected; every overlay link and image of the camera dashboard must fetch its PNG.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from services import InfluxServer
from test_influx_sink import create_db

from daemon.cli import main
from daemon.layout import ALERT_MEASUREMENT, CYCLE_MEASUREMENT, IMAGE_SCORE_MEASUREMENT
from daemon.metrics import MetricsServer
from daemon.overlays import OverlayStore
from daemon.sinks.lineprotocol import Point, encode_batch
from ingest.sim.dataset import write_recording
from ingest.sim.scenarios import plan_recording

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
PROVISIONING = DASHBOARDS / "provisioning"
DATASOURCE_FILE = PROVISIONING / "datasources" / "cellwatch.yaml"
PROVIDER_FILE = PROVISIONING / "dashboards" / "cellwatch.yaml"
RULES_FILE = PROVISIONING / "alerting" / "cellwatch-rules.yaml"
DASHBOARD_FILES = ("cell-overview.json", "robot-detail.json", "camera.json")
DATASOURCE_UID = "cellwatch-influx"
DATASOURCE_ENV = ("CELLWATCH_INFLUX_URL", "CELLWATCH_INFLUX_DB", "CELLWATCH_INFLUX_USER")
PASSWORD_ENV = "CELLWATCH_INFLUX_PASSWORD"

ROBOTS = ("cell1-arm", "cell2-arm")
SEEDS = (8, 9)
START = "2026-01-01T00:00:00Z"
MS = 1_000_000
FROM_MS = int(datetime.fromisoformat(START).timestamp()) * 1000  # the dashboards' time range:
TO_MS = FROM_MS + 3_600_000  # the hour from the replay's start
INTERVAL = "10s"  # what Grafana would put in $__interval
INTERVAL_NS = 10_000_000_000
ROBOT_FILTER = '"robot" =~ /^$robot$/'
CAMERA_FILTER = '"camera" =~ /^$camera$/'

# the cameras of the cell (a camera name may repeat on another robot) and their frames
CAMERAS = {"cell1-arm": ("cam1", "cam2"), "cell2-arm": ("cam1",)}
FRAMES = 100  # per camera, one every FRAME_STEP_NS from FRAMES_START_NS, 4 frames per robot cycle
FRAME_STEP_NS = 2 * 10**9
FRAMES_START_NS = (FROM_MS + 60_000) * MS
BURST = range(40, 50)  # frames over the threshold in a row: a camera alert
SPIKE = 75  # one frame over the threshold: no alert
SIGNAL_ANOMALOUS_CYCLES = {3: 2.5, 4: 4.0, 11: 3.0}  # the signal score of cycles over the threshold
IMAGE_THRESHOLD, IMAGE_REFERENCE = 22.5, 21.9  # an AST card's threshold and median calibration score
DEFAULT_DAEMON_URL = "http://localhost:9108"


def cameras_of(robots: tuple[str, ...]) -> tuple[str, ...]:
    """The values of the camera picker with these robots selected (sorted, as SHOW TAG VALUES lists them)."""
    return tuple(sorted({c for r in robots for c in CAMERAS[r]}))


# --- what Grafana does with the files ------------------------------------------------------------------
def grafana_escape_regex(value: str) -> str:
    """@grafana/data escapeRegex, which the InfluxDB datasource applies to variables used in a regex."""
    return re.sub(r"[\\^$*+?.()|\[\]{}/]", lambda m: "\\" + m.group(0), value)


def regex_value(values: tuple[str, ...], *, multi: bool) -> str:
    if multi and len(values) > 1:  # a multi-value variable: escaped values joined into a group
        return "(" + "|".join(grafana_escape_regex(v) for v in values) + ")"
    return grafana_escape_regex(values[0])


def interpolate(
    text: str, robots: tuple[str, ...], *, multi: bool, cameras: tuple[str, ...] | None = None
) -> str:
    """A query as Grafana sends it to InfluxDB for the dashboard time range and these selected robots
    (and cameras: None is the camera picker's All, every camera of the robots)."""
    value = regex_value(robots, multi=multi)
    camera = regex_value(cameras or cameras_of(robots), multi=True)
    text = text.replace("$timeFilter", f"time >= {FROM_MS}ms and time <= {TO_MS}ms")
    text = text.replace("$__interval_ms", str(INTERVAL_NS // MS)).replace("$__interval", INTERVAL)
    text = text.replace("$interval", INTERVAL)
    text = re.sub(r"\$\{camera(?::\w+)?\}|\$camera\b|\[\[camera\]\]", lambda _: camera, text)
    return re.sub(r"\$\{robot(?::\w+)?\}|\$robot\b|\[\[robot\]\]", lambda _: value, text)


def interpolate_text(content: str, robot: str, camera: str, daemon: str) -> str:
    """A text panel's content as Grafana renders it in one repeat of the panel: single values, not
    regex-escaped (HTML-escaped, which changes none of these names or URLs), `$__to` the range's end."""
    for pattern, value in (
        (r"\$\{robot(?::\w+)?\}|\$robot\b", robot),
        (r"\$\{camera(?::\w+)?\}|\$camera\b", camera),
        (r"\$\{daemon(?::\w+)?\}|\$daemon\b", daemon),
        (r"\$\{__to(?::\w+)?\}|\$__to\b", str(TO_MS)),
    ):
        content = re.sub(pattern, value.replace("\\", "\\\\"), content)
    return content


def interpolate_link(url: str, daemon: str, value: Any) -> str:
    """A table cell's data link as Grafana builds it: `${daemon:raw}` as typed, `${__value.raw}` the cell."""
    url = url.replace("${daemon:raw}", daemon).replace("${__value.raw}", str(value))
    assert "$" not in url, f"a data link variable the test does not know: {url}"
    return url


def expand_env(value: str, env: dict[str, str]) -> str:
    """Grafana's provisioning expansion: $__env{X}, then os.ExpandEnv ($X, ${X}; unset is empty)."""
    value = re.sub(r"\$__env\{(\w+)\}", lambda m: env.get(m.group(1), ""), value)
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


# --- the queries in the files --------------------------------------------------------------------------
@dataclass(frozen=True)
class Query:
    file: str
    where: str  # e.g. 'panel "Latest alerts" query A'
    text: str
    multi: bool  # the dashboard's robot variable takes several values
    camera_multi: bool = False  # the dashboard's camera variable takes several values

    def __str__(self) -> str:
        return f"{self.file}: {self.where}"

    def says(self, what: str) -> str:
        """A failure message naming the dashboard (or rules file), the panel and the query."""
        return f"{self}: {what}\n  query: {self.text}"


def load_dashboard(name: str) -> dict[str, Any]:
    return dict(json.loads((DASHBOARDS / name).read_text()))


def load_yaml(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def robot_variable(dashboard: dict[str, Any]) -> dict[str, Any]:
    return next(v for v in dashboard["templating"]["list"] if v["name"] == "robot")


def variable(dashboard: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((v for v in dashboard["templating"]["list"] if v["name"] == name), None)


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)  # newer Grafana saves an object


def dashboard_queries(name: str) -> list[Query]:
    """Every InfluxDB query of a dashboard: panels, query variables (not the daemon URL textbox),
    annotations. Text panels have none (their content is checked by the overlay tests)."""
    dashboard = load_dashboard(name)
    multi = bool(robot_variable(dashboard).get("multi"))
    camera = variable(dashboard, "camera")
    kw = {"camera_multi": bool(camera and camera.get("multi"))}
    out = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            where = f'panel "{panel["title"]}" query {target["refId"]}'
            out.append(Query(name, where, target["query"], multi, **kw))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out.append(Query(name, f"variable ${var['name']}", variable_query(var), multi, **kw))
    for annotation in dashboard["annotations"]["list"]:
        if not annotation.get("builtIn"):
            target = annotation.get("target") or annotation
            out.append(Query(name, f'annotation "{annotation["name"]}"', target["query"], multi, **kw))
    return out


def rule_queries() -> list[Query]:
    out = []
    for group in load_yaml(RULES_FILE)["groups"]:
        for rule in group["rules"]:
            for data in rule["data"]:
                if data["datasourceUid"] != "__expr__":
                    where = f'rule "{rule["title"]}" query {data["refId"]}'
                    out.append(Query(RULES_FILE.name, where, data["model"]["query"], multi=False))
    return out


def find(file: str, where: str) -> Query:
    candidates = rule_queries() if file == RULES_FILE.name else dashboard_queries(file)
    queries = [q for q in candidates if q.file == file and where in q.where]
    assert len(queries) == 1, f"{file}: expected one query at {where!r}, found {[q.where for q in queries]}"
    return queries[0]


def uses(query: Query, name: str) -> bool:
    return f"${name}" in query.text or f"${{{name}" in query.text


def selections(query: Query) -> list[tuple[str, ...]]:
    """Robot selections to run a query for: all and one robot where several can be picked, else each."""
    if not uses(query, "robot"):
        return [ROBOTS]
    return [ROBOTS, ROBOTS[1:]] if query.multi else [(robot,) for robot in ROBOTS]


def camera_selections(query: Query, robots: tuple[str, ...]) -> list[tuple[str, ...] | None]:
    """Camera selections: All (None), and all but the first camera where several can be picked."""
    if not uses(query, "camera"):
        return [None]
    cameras = cameras_of(robots)
    return [None, cameras[1:]] if query.camera_multi and len(cameras) > 1 else [None]


CASES = [
    pytest.param(
        query,
        robots,
        cameras,
        id=f"{query}, robots={'+'.join(robots)}" + (f", cameras={'+'.join(cameras)}" if cameras else ""),
    )
    for query in [q for name in DASHBOARD_FILES for q in dashboard_queries(name)] + rule_queries()
    for robots in selections(query)
    for cameras in camera_selections(query, robots)
]


# --- the cell: replayed through the daemon into InfluxDB, its cameras written with the daemon's schema --
@dataclass(frozen=True)
class FrameRow:  # one point of measurement image_score
    time_ns: int
    score: float
    normalized: float
    is_anomaly: bool
    frame: str
    seq: int
    cycle: int
    overlay: str


@dataclass(frozen=True)
class CameraAlert:  # one point of measurement alert, kind camera
    start_ns: int
    end_ns: int
    peak_score: float
    frame: str
    overlay: str
    text: str
    frames: int


@dataclass(frozen=True)
class FusedRow:  # one point of measurement cycle_fused
    time_ns: int
    cycle: int
    signal_score: float
    camera_score: float
    signal_anomaly: bool
    camera_anomaly: bool
    fired: str


Key = tuple[str, str]  # (robot, camera)


@dataclass(frozen=True)
class Cell:
    db: str
    scores: dict[str, list[list[Any]]]  # robot -> [time_ns, score, normalized, is_anomaly, cycle, threshold]
    # robot -> [start_ns, end_ns, peak_score, top_signals, text, peak_cycle] (signal alerts)
    alerts: dict[str, list[list[Any]]]
    localization: dict[str, list[list[Any]]]  # robot -> [time_ns, contribution, peak_cycle, signal]
    frames: dict[Key, list[FrameRow]]
    camera_alerts: dict[Key, list[CameraAlert]]
    fused: dict[Key, list[FusedRow]]
    overlays: Path  # the overlay directory the daemon's metrics endpoint serves


def fired(signal: bool, camera: bool) -> str:
    return {(False, False): "none", (True, False): "signals", (False, True): "camera"}.get(
        (signal, camera), "both"
    )


def camera_alert_point(robot: str, camera: str, alert: CameraAlert, *, firing: bool = False) -> Point:
    """A camera alert as common.md specifies it (the signal alert's fields, tag camera, kind camera)."""
    return Point(
        ALERT_MEASUREMENT,
        {
            "alert_id": f"{robot}/{camera}-{alert.start_ns}",
            "kind": "camera",
            "state": "firing" if firing else "resolved",
            "firing": int(firing),
            "end_ns": alert.end_ns,
            "updated_ns": alert.end_ns,
            "duration_s": (alert.end_ns - alert.start_ns) / 1e9,
            "peak_score": alert.peak_score,
            "peak_cycle": -1,
            "event_time_ns": alert.start_ns,
            "windows": alert.frames,
            "cycles": "",
            "cycle_count": 0,
            "top_signals": "",
            "frame": alert.frame,
            "overlay": alert.overlay,
            "text": alert.text,
        },
        alert.start_ns,
        {"robot": robot, "model": "ast", "camera": camera},
    )


def write_points(influx: InfluxServer, db: str, points: list[Point]) -> None:
    request = urllib.request.Request(
        f"{influx.url}/write?db={db}&precision=ns", data=encode_batch(points), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 204


def write_cameras(
    influx: InfluxServer, db: str, overlay_dir: Path
) -> tuple[dict[Key, list[FrameRow]], dict[Key, list[CameraAlert]], dict[Key, list[FusedRow]]]:
    """Each camera's frames (a burst over the threshold, one lone frame over it), the burst's alert and
    the fused cycles, as the daemon writes them; the overlays of the frames over the threshold saved as
    the daemon saves them (OverlayStore, the raw map of the image model with its card's threshold)."""
    store = OverlayStore(overlay_dir, max_files=1000, max_bytes=10**9)
    span = IMAGE_THRESHOLD - IMAGE_REFERENCE
    frames: dict[Key, list[FrameRow]] = {}
    alerts: dict[Key, list[CameraAlert]] = {}
    fused: dict[Key, list[FusedRow]] = {}
    points: list[Point] = []
    for k, key in enumerate((robot, camera) for robot in ROBOTS for camera in CAMERAS[robot]):
        robot, camera = key
        rng = np.random.default_rng(100 + k)
        normalized = rng.uniform(0.05, 0.8, FRAMES)
        normalized[list(BURST)] = rng.uniform(1.5, 6.0, len(BURST))
        normalized[SPIKE] = 1.2
        frame_rows = []
        for i, value in enumerate(normalized.tolist()):
            time_ns = FRAMES_START_NS + i * FRAME_STEP_NS + k * 137 * MS  # cameras not in lockstep
            ref = f"/srv/frames/{robot}/{camera}/{i:06d}.png"
            overlay = ""
            if value > 1:
                image = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
                amap = np.full((16, 16), IMAGE_REFERENCE + value * span, np.float32)
                overlay = store.save(robot, camera, time_ns, i, image, amap, IMAGE_THRESHOLD, IMAGE_REFERENCE)
                assert overlay
            row = FrameRow(time_ns, IMAGE_REFERENCE + value * span, value, value > 1, ref, i, i // 4, overlay)
            frame_rows.append(row)
            points.append(
                Point(
                    IMAGE_SCORE_MEASUREMENT,
                    {
                        "score": row.score,
                        "normalized_score": row.normalized,
                        "threshold": IMAGE_THRESHOLD,
                        "is_anomaly": row.is_anomaly,
                        "frame": row.frame,
                        "seq": row.seq,
                        "cycle": row.cycle,
                        "overlay": row.overlay,
                        "label": "",
                    },
                    time_ns,
                    {"robot": robot, "camera": camera, "model": "ast"},
                )
            )
        frames[key] = frame_rows
        burst = [frame_rows[i] for i in BURST]
        peak = max(burst, key=lambda r: r.normalized)
        text = (
            f"{robot} camera {camera}: image score {peak.normalized:.2f}x threshold at frame {peak.frame}; "
            f"overlay {peak.overlay}"
        )
        alert = CameraAlert(
            burst[0].time_ns, burst[-1].time_ns, peak.normalized, peak.frame, peak.overlay, text, len(burst)
        )
        alerts[key] = [alert]
        points.append(camera_alert_point(robot, camera, alert))
        cycles = []
        for cycle in range(FRAMES // 4):
            mine = frame_rows[4 * cycle : 4 * cycle + 4]
            signal = SIGNAL_ANOMALOUS_CYCLES.get(cycle, float(rng.uniform(0.1, 0.8)))
            camera_score = max(r.normalized for r in mine)
            cycle_row = FusedRow(
                mine[-1].time_ns,
                cycle,
                signal,
                camera_score,
                signal > 1,
                camera_score > 1,
                fired(signal > 1, camera_score > 1),
            )
            cycles.append(cycle_row)
            points.append(
                Point(
                    CYCLE_MEASUREMENT,
                    {
                        "cycle": cycle_row.cycle,
                        "signal_score": cycle_row.signal_score,
                        "camera_score": cycle_row.camera_score,
                        "signal_anomaly": cycle_row.signal_anomaly,
                        "camera_anomaly": cycle_row.camera_anomaly,
                        "fired": cycle_row.fired,
                    },
                    cycle_row.time_ns,
                    {"robot": robot, "camera": camera},
                )
            )
        assert {c.fired for c in cycles} == {"none", "signals", "camera", "both"}
        fused[key] = cycles
    write_points(influx, db, points)
    return frames, alerts, fused


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory, influx: InfluxServer) -> Cell:
    root = tmp_path_factory.mktemp("dashboards")
    recordings = []
    for robot, seed in zip(ROBOTS, SEEDS, strict=True):
        path = root / f"{robot}.parquet"
        write_recording(path, plan_recording(cycles=60, seed=seed), seed=seed)
        recordings.append(path)
    model = root / "model"
    train = ["train", "--data", str(recordings[0]), "--out", str(model), "--rate-divider", "10"]
    assert main([*train, "--epochs", "3"]) == 0
    create_db(influx, "dashboards")
    config = {
        "sources": [
            {"type": "voraus_replay", "robot": robot, "path": str(path), "speed": 1e6, "start": START}
            for robot, path in zip(ROBOTS, recordings, strict=True)
        ],
        "model": {"path": str(model)},
        "scoring": {"batch": 8, "max_wait_ms": 5},
        "sinks": {
            "influxdb": {"url": influx.url, "database": "dashboards", "spool_dir": str(root / "spool")}
        },
    }
    (root / "cellwatch.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(root / "cellwatch.yaml")]) == 0

    fields = '"score", "normalized_score", "is_anomaly", "cycle", "threshold"'
    alert_fields = '"end_ns", "peak_score", "top_signals", "text", "peak_cycle"'
    scores, alerts, localization = {}, {}, {}
    for robot in ROBOTS:
        scores[robot] = influx.series(
            f"SELECT {fields} FROM anomaly_score WHERE robot = '{robot}'", "dashboards"
        )
        alerts[robot] = influx.series(
            f"SELECT {alert_fields} FROM alert WHERE robot = '{robot}' AND camera = ''", "dashboards"
        )
        localization[robot] = influx.series(
            f'SELECT "contribution", "peak_cycle", "signal" FROM localization WHERE robot = \'{robot}\'',
            "dashboards",
        )
        assert scores[robot], f"the daemon wrote no scores for {robot}"
        assert alerts[robot], f"the tiny model raises alerts for {robot}"
        assert {r[2] for r in localization[robot]} == {a[5] for a in alerts[robot]}, (
            f"the daemon localizes the peak window of every alert of {robot}"
        )
        times = [r[0] for r in scores[robot] + localization[robot]] + [a[1] for a in alerts[robot]]
        assert min(times) >= FROM_MS * MS, "the dashboards' time range starts before the data"
        assert max(times) <= TO_MS * MS, "the dashboards' time range ends after the data"
    frames, camera_alerts, fused = write_cameras(influx, "dashboards", root / "overlays")
    times = [f.time_ns for rows in frames.values() for f in rows]
    assert FROM_MS * MS <= min(times) <= max(times) <= TO_MS * MS
    for (robot, camera), rows in frames.items():
        written = influx.series(
            f"SELECT \"frame\" FROM image_score WHERE robot = '{robot}' AND camera = '{camera}'", "dashboards"
        )
        assert [r[1] for r in written] == [f.frame for f in rows], f"the frames of {robot} {camera}"
    return Cell("dashboards", scores, alerts, localization, frames, camera_alerts, fused, root / "overlays")


@pytest.fixture(scope="module")
def daemon(cell: Cell) -> Iterator[str]:
    """The daemon's metrics endpoint serving the cell's overlay directory: its base URL, what the camera
    dashboard's Daemon URL variable is set to."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = MetricsServer("127.0.0.1:0", list, overlays=cell.overlays)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def fetch(url: str) -> tuple[int, str, bytes]:
    """GET as the browser does: status, content type, body."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


@pytest.fixture(scope="module")
def datasource(cell: Cell, influx: InfluxServer) -> dict[str, Any]:
    """The provisioned datasource as Grafana sees it, with the environment pointing at the test InfluxDB."""
    env = {"CELLWATCH_INFLUX_URL": influx.url, "CELLWATCH_INFLUX_DB": cell.db}
    env |= {"CELLWATCH_INFLUX_USER": "", PASSWORD_ENV: ""}  # the test InfluxDB has authentication off
    (source,) = load_yaml(DATASOURCE_FILE)["datasources"]
    return {"url": expand_env(source["url"], env), "database": expand_env(source["jsonData"]["dbName"], env)}


def run(influx: InfluxServer, datasource: dict[str, Any], query: Query, text: str) -> list[dict[str, Any]]:
    """Run an interpolated query through the datasource; the series it returns (failing on any error)."""
    assert datasource["url"] == influx.url
    leftover = re.findall(r"\$(?!/)\{?\w*", text)  # `$/` is a regex anchor, anything else a variable
    assert not leftover, f"{query}: Grafana variables left after interpolation: {leftover}\n  query: {text}"
    try:
        body = influx.query(text, datasource["database"])
    except urllib.error.HTTPError as err:
        pytest.fail(
            f"{query}: InfluxDB rejected the query ({err.code} {err.read().decode()})\n  query: {text}"
        )
    result = body["results"][0]
    assert "error" not in result, f"{query}: InfluxDB error {result['error']!r}\n  query: {text}"
    series = list(result.get("series") or [])
    assert any(v is not None for s in series for row in s["values"] for v in row[1:]), (
        f"{query}: no data came back\n  query: {text}"
    )
    return series


def rows(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row as a dict of column -> value, with the series' tags."""
    return [
        {**s.get("tags", {}), **dict(zip(s["columns"], values, strict=True))}
        for s in series
        for values in s["values"]
    ]


def is_empty(value: Any) -> bool:
    return value is None or (type(value) is int and value == 0)  # fill(0) writes 0 where nothing was


def buckets(times_ns: list[int], width_ns: int) -> set[int]:
    return {t - t % width_ns for t in times_ns}


UNITS_NS = {"s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


# --- every query runs and returns the written series ---------------------------------------------------
@pytest.mark.parametrize(("query", "robots", "cameras"), CASES)
def test_query_returns_the_series_written_for_the_selected_robots(
    query: Query,
    robots: tuple[str, ...],
    cameras: tuple[str, ...] | None,
    cell: Cell,
    influx: InfluxServer,
    datasource: dict[str, Any],
) -> None:
    text = interpolate(query.text, robots, multi=query.multi, cameras=cameras)
    series = run(influx, datasource, query, text)
    got = rows(series)
    selected = cameras or cameras_of(robots)
    shown = f"; cameras {', '.join(selected)}" if uses(query, "camera") else ""
    where = f"{query} (robots {', '.join(robots)}{shown})\n  query: {text}"

    if text.startswith("SHOW TAG VALUES"):
        key = re.search(r'WITH KEY = "(\w+)"', text)
        assert key, f"{where}: which tag?"
        listed = sorted(r["value"] for r in got)
        if key.group(1) == "robot":
            assert listed == sorted(ROBOTS), f"{where}: the robot picker lists every robot"
        else:
            assert key.group(1) == "camera", where
            assert listed == list(cameras_of(robots)), f"{where}: the camera picker lists the robot's cameras"
        return
    robot_tags = {s["tags"]["robot"] for s in series if "robot" in s.get("tags", {})}
    robot_column = {r["robot"] for r in got if r.get("robot") is not None}
    if robot_tags or robot_column:  # the series say which robot they are: exactly the selected ones
        assert (robot_tags or robot_column) == set(robots), (
            f"{where}: wrong robots {robot_tags or robot_column}"
        )
    else:
        assert len(robots) == 1, f"{where}: the series do not say which robot they are"
        assert "$robot" in query.text, f"{where}: the query does not filter by robot"
    if uses(query, "camera"):  # the series or rows say which camera they are: exactly the selected ones
        shown_cameras = {s["tags"]["camera"] for s in series if s.get("tags", {}).get("camera")}
        shown_cameras |= {r["camera"] for r in got if r.get("camera")}
        assert shown_cameras == set(selected), f"{where}: wrong cameras {shown_cameras}"

    measurement = re.search(r'FROM "(\w+)"', text)
    assert measurement, f"{where}: no measurement"
    grouped = re.search(r"GROUP BY time\((\d+)([smh])\)", text)
    if measurement.group(1) == ALERT_MEASUREMENT:
        check_alerts(got, text, robots, selected if uses(query, "camera") else None, cell, where)
        return
    if measurement.group(1) == "localization":
        check_localization(series, robots, cell, grouped, where)
        return
    if measurement.group(1) in (IMAGE_SCORE_MEASUREMENT, CYCLE_MEASUREMENT):
        check_camera_measurement(
            series, text, expected_camera_times(cell, text, robots, selected), grouped, where
        )
        return
    assert measurement.group(1) == "anomaly_score", f"{where}: unknown measurement"
    for robot in robots:
        mine = [s for s in series if s.get("tags", {}).get("robot", robot) == robot]
        values = [row for s in mine for row in s["values"]]
        if grouped:  # a value in every interval that has windows of the robot, none elsewhere
            width = int(grouped.group(1)) * UNITS_NS[grouped.group(2)]
            filled = {row[0] for row in values if not all(is_empty(v) for v in row[1:])}
            assert filled == buckets([w[0] for w in cell.scores[robot]], width), (
                f"{where}: the intervals with data differ for {robot}"
            )
        else:  # one aggregate per robot
            assert len(values) == 1, f"{where}: {len(values)} rows for {robot}, expected one"


def expected_alerts(
    cell: Cell, text: str, robots: tuple[str, ...], cameras: tuple[str, ...] | None
) -> list[tuple[str, str, int]]:
    """(robot, camera or "" for a signal alert, start) of the alerts a query selects: camera alerts only
    (kind = camera), signal alerts only (no camera tag), or both; `cameras` None: not filtered by camera."""
    signal = [(robot, "", a[0]) for robot in robots for a in cell.alerts[robot]]
    camera = [
        (robot, cam, a.start_ns)
        for (robot, cam), alerts in cell.camera_alerts.items()
        for a in alerts
        if robot in robots and (cameras is None or cam in cameras)
    ]
    if "\"kind\" = 'camera'" in text:
        return camera
    if "\"camera\" = ''" in text:
        return signal
    return signal + camera


def check_alerts(
    got: list[dict[str, Any]],
    text: str,
    robots: tuple[str, ...],
    cameras: tuple[str, ...] | None,
    cell: Cell,
    where: str,
) -> None:
    expected = expected_alerts(cell, text, robots, cameras)
    if "last(" in text:  # the lifecycle rule: the newest alert's state per robot and camera
        keys = sorted((r["robot"], r.get("camera") or "") for r in got)
        assert keys == sorted({(robot, cam) for robot, cam, _ in expected}), (
            f"{where}: one row per robot (signals) and per camera"
        )
        assert {r["firing"] for r in got} == {0}, f"{where}: the replay ended, every alert resolved"
        return
    assert len(got) == len(expected), f"{where}: {len(got)} rows for {len(expected)} alerts"
    assert sorted(r["time"] for r in got) == sorted(start for _, _, start in expected), f"{where}: the alerts"


def expected_camera_times(
    cell: Cell, text: str, robots: tuple[str, ...], cameras: tuple[str, ...]
) -> dict[Key, list[int]]:
    """(robot, camera) -> times of the image_score or cycle_fused points a query selects (frames over the
    threshold only, or cycles with one value of `fired`, where it says so)."""
    anomalous = '"is_anomaly" = true' in text
    fired_is = re.search(r"\"fired\" = '(\w+)'", text)
    out: dict[Key, list[int]] = {}
    for robot in robots:
        for camera in CAMERAS[robot]:
            if camera not in cameras:
                continue
            key = (robot, camera)
            if f'FROM "{IMAGE_SCORE_MEASUREMENT}"' in text:
                out[key] = [f.time_ns for f in cell.frames[key] if f.is_anomaly or not anomalous]
            else:
                wanted = fired_is.group(1) if fired_is else None
                out[key] = [c.time_ns for c in cell.fused[key] if wanted in (None, c.fired)]
    return out


def check_camera_measurement(
    series: list[dict[str, Any]],
    text: str,
    expected: dict[Key, list[int]],
    grouped: re.Match[str] | None,
    where: str,
) -> None:
    """Per time interval and camera: an interval with data exactly where points were written; counts per
    camera: the number written; a table: the points written (newest first, up to its LIMIT)."""
    robots = {robot for robot, _ in expected}
    robot = next(iter(robots)) if len(robots) == 1 else None  # a one-robot dashboard: no robot tag

    def key_of(s: dict[str, Any]) -> Key:
        tags = s.get("tags", {})
        assert "camera" in tags, f"{where}: not one series per camera"
        return (tags.get("robot") or robot or "?", tags["camera"])

    if grouped:
        width = int(grouped.group(1)) * UNITS_NS[grouped.group(2)]
        for s in series:
            filled = {row[0] for row in s["values"] if not all(is_empty(v) for v in row[1:])}
            assert filled == buckets(expected[key_of(s)], width), f"{where}: the intervals of {key_of(s)}"
        assert {key_of(s) for s in series} == set(expected), f"{where}: the cameras"
        return
    if "count(" in text:
        counts = {key_of(s): s["values"][0][1] for s in series}
        assert counts == {k: len(v) for k, v in expected.items() if v}, f"{where}: the counts per camera"
        return
    (table,) = series
    limit = re.search(r"LIMIT (\d+)", text)
    times = sorted((t for v in expected.values() for t in v), reverse=True)
    times = times[: int(limit.group(1))] if limit else times
    assert [row[0] for row in table["values"]] == times, f"{where}: the points written, newest first"


def check_localization(
    series: list[dict[str, Any]],
    robots: tuple[str, ...],
    cell: Cell,
    grouped: re.Match[str] | None,
    where: str,
) -> None:
    """One series per signal written for the robot, `(all)` among them, contributions in [0, 1]."""
    assert all("signal" in s.get("tags", {}) for s in series), f"{where}: not one series per signal"
    for robot in robots:
        mine = [s for s in series if s["tags"].get("robot", robot) == robot]
        written: dict[str, list[int]] = {}  # signal -> times of its bins
        for time_ns, _, _, signal in cell.localization[robot]:
            written.setdefault(signal, []).append(time_ns)
        shown = {s["tags"]["signal"]: [row for row in s["values"] if row[1] is not None] for s in mine}
        assert set(shown) == set(written), f"{where}: the signals of {robot}"
        assert "(all)" in shown, f"{where}: no (all) series (the sum over all signals) for {robot}"
        values = [v for filled in shown.values() for row in filled for v in row[1:]]
        assert all(0 <= v <= 1 for v in values), f"{where}: contributions outside [0, 1] for {robot}"
        for signal, filled in shown.items():
            if grouped:  # a value in every interval that has bins of the signal, none elsewhere
                width = int(grouped.group(1)) * UNITS_NS[grouped.group(2)]
                assert {row[0] for row in filled} == buckets(written[signal], width), (
                    f"{where}: the intervals with data differ for {robot}, signal {signal}"
                )
            else:  # one aggregate per signal
                assert len(filled) == 1, f"{where}: {len(filled)} rows for {robot}, {signal}, expected one"


def test_every_panel_and_variable_has_a_query_that_is_tested() -> None:
    for name in DASHBOARD_FILES:
        dashboard = load_dashboard(name)
        tested = [q.where for q in dashboard_queries(name)]
        for panel in all_panels(dashboard):
            if panel["type"] == "text":  # no query: test_latest_overlay_panel_... fetches its images
                assert panel["title"] == "Latest overlay: $camera", f"{name}: an untested text panel"
            elif panel["type"] != "row":
                title = f'panel "{panel["title"]}" '
                assert any(w.startswith(title) for w in tested), f"{name}: {title}has no query"
        for var in dashboard["templating"]["list"]:
            if var["type"] == "query":
                assert any(w.startswith(f"variable ${var['name']}") for w in tested), (
                    f"{name}: ${var['name']}"
                )
            else:  # the daemon's URL, typed by the user: nothing to query
                assert (var["name"], var["type"]) == ("daemon", "textbox"), f"{name}: variable {var['name']}"
        assert any(w.startswith("variable $robot") for w in tested), f"{name}: the robot picker"
        assert any(w.startswith("annotation ") for w in tested), f"{name}: the alert annotations"
    assert rule_queries(), f"{RULES_FILE.name}: no InfluxDB query in the alert rules"


# --- what the key panels show --------------------------------------------------------------------------
def test_overview_score_panel_plots_each_robots_max_normalized_score_per_interval(
    cell: Cell, influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    query = find("cell-overview.json", 'panel "Normalized anomaly score per robot"')
    series = run(influx, datasource, query, interpolate(query.text, ROBOTS, multi=True))
    for s in series:
        robot = s["tags"]["robot"]
        expected: dict[int, float] = {}
        for time_ns, _, normalized, *_ in cell.scores[robot]:
            bucket = time_ns - time_ns % INTERVAL_NS
            expected[bucket] = max(expected.get(bucket, float("-inf")), normalized)
        assert dict(s["values"]) == pytest.approx(expected), query.says(f"the values for {robot}")
        assert any(v > 1 for v in expected.values()), "some windows are above the threshold line (1.0)"
        assert any(v < 1 for v in expected.values()), "and some below"


def test_overview_counts_anomalous_windows_per_robot(
    cell: Cell, influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    query = find("cell-overview.json", 'panel "Anomalous windows in range"')
    got = rows(run(influx, datasource, query, interpolate(query.text, ROBOTS, multi=True)))
    counts = {r["robot"]: r["count"] for r in got}
    assert counts == {robot: sum(w[3] for w in cell.scores[robot]) for robot in ROBOTS}, query.says(
        "the counts"
    )


def test_overview_latest_alerts_table_is_newest_first_with_peak_and_top_signals(
    cell: Cell, influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    query = find("cell-overview.json", 'panel "Latest alerts"')
    (series,) = run(influx, datasource, query, interpolate(query.text, ROBOTS, multi=True))
    columns = ["time", "robot", "camera", "state", "peak_score", "top_signals", "duration_s"]
    assert series["columns"] == columns, query.says("the columns")
    times = [row[0] for row in series["values"]]
    assert times == sorted(times, reverse=True), query.says("newest alert first")
    expected: set[tuple[Any, ...]] = {
        (a[0], robot, None, a[2], a[3]) for robot in ROBOTS for a in cell.alerts[robot]
    }
    expected |= {  # the cameras' alerts among them, with their camera and no top signals
        (a.start_ns, robot, camera, a.peak_score, "")
        for (robot, camera), alerts in cell.camera_alerts.items()
        for a in alerts
    }
    got = {(row[0], row[1], row[2], row[4], row[5]) for row in series["values"]}
    assert got == expected, query.says("one row per alert")
    # the replay has ended: every alert is resolved
    assert {row[3] for row in series["values"]} == {"resolved"}, query.says("the states")
    # (an alert of a single window lasts 0 s from its start to its end window)
    assert all(row[6] >= 0 for row in series["values"]), query.says("the durations")
    assert any(row[6] > 0 for row in series["values"]), query.says("alerts over several windows")


def test_overview_health_shows_when_each_robot_was_last_scored(
    cell: Cell, influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    query = find("cell-overview.json", 'panel "Last scored window per robot"')
    got = rows(run(influx, datasource, query, interpolate(query.text, ROBOTS, multi=True)))
    last = {robot: max(cell.scores[robot]) for robot in ROBOTS}
    assert {r["robot"]: (r["time"], r["last cycle"]) for r in got} == {
        robot: (row[0], row[4]) for robot, row in last.items()
    }, query.says("the last window of each robot")


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_alert_annotations_span_each_alert_from_start_to_end(
    name: str, cell: Cell, influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    dashboard = load_dashboard(name)
    (annotation,) = [a for a in dashboard["annotations"]["list"] if not a.get("builtIn")]
    target = annotation.get("target") or annotation
    query = find(name, f'annotation "{annotation["name"]}"')
    for robots in selections(query):
        for cameras in camera_selections(query, robots):
            text = interpolate(query.text, robots, multi=query.multi, cameras=cameras)
            check_annotations(
                query, target, rows(run(influx, datasource, query, text)), robots, cameras, cell
            )


def check_annotations(
    query: Query,
    target: dict[str, Any],
    got: list[dict[str, Any]],
    robots: tuple[str, ...],
    cameras: tuple[str, ...] | None,
    cell: Cell,
) -> None:
    """One annotation per alert the query selects, from its start to its end, with its text and tag."""
    selected = (cameras or cameras_of(robots)) if uses(query, "camera") else None
    wanted = set(expected_alerts(cell, query.text, robots, selected))
    alerts = {
        (a[0], a[4]): a[1] / MS for robot in robots for a in cell.alerts[robot] if (robot, "", a[0]) in wanted
    }
    for (robot, camera), camera_alerts in cell.camera_alerts.items():
        for a in camera_alerts:
            if (robot, camera, a.start_ns) in wanted:
                alerts[(a.start_ns, a.text)] = a.end_ns / MS
    assert alerts, query.says("no alerts to show")
    assert len(got) == len(alerts), query.says("one annotation per alert")
    # an annotation starts at the alert's start, shows its text and ends at timeEnd, which Grafana
    # reads as epoch milliseconds (the time unit it asks InfluxDB for)
    shown = {(r["time"], r[target["textColumn"]]): r[target["timeEndColumn"]] for r in got}
    assert shown == pytest.approx(alerts, abs=0.01), query.says("start, text and end (ms) of each alert")
    tags = robots if target["tagsColumn"] == "robot" else tuple(selected or ())
    assert all(r[target["tagsColumn"]] in tags for r in got), query.says(
        f"tagged with the {target['tagsColumn']}"
    )


def test_detail_state_timeline_is_red_exactly_where_windows_were_anomalous(
    cell: Cell, influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    query = find("robot-detail.json", 'panel "Anomalous windows over time"')
    score = find("robot-detail.json", 'panel "Anomaly score and threshold" query A')
    for robot in ROBOTS:
        states = dict(
            run(influx, datasource, query, interpolate(query.text, (robot,), multi=False))[0]["values"]
        )
        flagged = buckets([w[0] for w in cell.scores[robot] if w[3]], INTERVAL_NS)
        assert {t for t, anomalous in states.items() if anomalous} == flagged, query.says(robot)
        assert not all(states.values()), query.says(f"{robot} also has normal intervals")
        # the score panel agrees: score over the threshold line in exactly the red intervals
        (series,) = run(influx, datasource, score, interpolate(score.text, (robot,), multi=False))
        assert series["columns"] == ["time", "score", "threshold"], score.says("the columns")
        assert {t for t, s, thr in series["values"] if s > thr} == flagged, score.says(
            f"score over threshold in the red intervals of {robot}"
        )
        assert {thr for _, _, thr in series["values"]} == {cell.scores[robot][0][5]}, "one model threshold"


def test_detail_parts_panel_shows_each_part_of_the_fused_score(
    cell: Cell, influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    """The default model is fused: per interval, each part's highest value, and a window's raw score is
    its most anomalous part (the fused score is their maximum)."""
    query = find("robot-detail.json", 'panel "Which part of the fused detector fired"')
    for robot in ROBOTS:
        points = influx.series(
            'SELECT "score", "part_nll", "part_linres", "part_pca" FROM anomaly_score '
            f"WHERE robot = '{robot}'",
            "dashboards",
        )
        assert points, f"no scores for {robot}"
        for _, score, *parts in points:
            assert score == pytest.approx(max(parts), rel=1e-6, abs=1e-9), "the fused score is the top part"
        (series,) = run(influx, datasource, query, interpolate(query.text, (robot,), multi=False))
        names = ["MVT-Flow NLL", "local linear residual", "whole-cycle PCA residual"]
        assert series["columns"] == ["time", *names], query.says("the columns")
        expected: dict[int, list[float]] = {}
        for time_ns, _, *parts in points:
            bucket = time_ns - time_ns % INTERVAL_NS
            old = expected.get(bucket, [float("-inf")] * 3)
            expected[bucket] = [max(a, b) for a, b in zip(old, parts, strict=True)]
        got = {row[0]: row[1:] for row in series["values"]}
        assert got.keys() == expected.keys(), query.says(f"the intervals of {robot}")
        for bucket, values in expected.items():
            assert got[bucket] == pytest.approx(values), query.says(f"the parts of {robot}")


def test_detail_localization_table_gives_each_alerts_event_time_and_top_signals(
    cell: Cell, influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    query = find("robot-detail.json", 'panel "Localized events per alert"')
    for robot in ROBOTS:
        got = rows(run(influx, datasource, query, interpolate(query.text, (robot,), multi=False)))
        assert len(got) == len(cell.alerts[robot]), query.says(robot)
        for row in got:
            assert row["event_time"] == pytest.approx(row["event_time_ns"] / MS), query.says(
                "event time (ms)"
            )
            # the event lies in the peak window: a cycle of the alert (at most ~13 s before its start)
            assert row["time"] - 14 * 10**9 <= row["event_time_ns"], query.says(f"event time of {robot}")
            assert len(row["top_signals"].split(", ")) == 3, query.says(f"top signals of {robot}")
            assert row["peak_score"] > 1, query.says("an alert peaks above the threshold")


def test_detail_localization_heatmap_shows_each_alerts_peak_window_per_signal(
    cell: Cell, influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    title = "Temporal localization of alerts (heatmap)"
    (panel,) = [p for p in all_panels(load_dashboard("robot-detail.json")) if p["title"] == title]
    query = find("robot-detail.json", f'panel "{title}"')
    # Grafana's heatmap takes the series as they come as its rows (no bucketing), named by the alias,
    # the first series at the top
    assert panel["type"] == "heatmap", query.says("the panel type")
    assert panel["options"]["calculate"] is False, query.says("the heatmap would re-bucket the values")
    assert panel["options"]["yAxis"]["reverse"] is True, query.says("the first row is not at the top")
    assert [t["alias"] for t in panel["targets"]] == ["$tag_signal"], query.says("rows named by signal")
    assert panel["options"]["color"]["min"] == 0, query.says("the color scale starts at 0")
    assert panel["options"]["color"]["max"] == 1, query.says("the color scale ends at 1")
    for robot in ROBOTS:
        series = run(influx, datasource, query, interpolate(query.text, (robot,), multi=False))
        heat = {s["tags"]["signal"]: dict(s["values"]) for s in series}
        assert next(iter(heat)) == "(all)", query.says(f"(all) is the first series (top row) for {robot}")
        # one regular time grid for every row: Grafana sizes all cells by its first two times
        grids = {tuple(times) for times in heat.values()}
        assert len(grids) == 1, query.says(f"the rows of {robot} do not share one time grid")
        (grid,) = grids
        assert {b - a for a, b in pairwise(grid)} == {INTERVAL_NS}, query.says(
            f"the time grid of {robot} is not one row per interval"
        )
        # the cells: the highest contribution the daemon wrote per interval and signal, empty elsewhere
        expected: dict[str, dict[int, float]] = {}
        for time_ns, contribution, _, signal in cell.localization[robot]:
            bucket = time_ns - time_ns % INTERVAL_NS
            cells = expected.setdefault(signal, {})
            cells[bucket] = max(cells.get(bucket, 0.0), contribution)
        shown = {signal: {t: v for t, v in cells.items() if v is not None} for signal, cells in heat.items()}
        assert set(shown) == set(expected), query.says(f"the rows of {robot}")
        for signal, cells in shown.items():
            assert cells == pytest.approx(expected[signal]), query.says(f"the cells of {robot}, {signal}")
        # each alert's peak window peaks at 1.0 (dark red) in the (all) row; its top signals (at most 5)
        # have their own rows, their cells never above the (all) cell
        total = shown["(all)"]
        for alert in cell.alerts[robot]:
            bins = [r for r in cell.localization[robot] if r[2] == alert[5]]
            peak = max((r for r in bins if r[3] == "(all)"), key=lambda r: r[1])
            assert total[peak[0] - peak[0] % INTERVAL_NS] == pytest.approx(1.0), query.says(
                f"the peak window of {robot}'s alert in cycle {alert[5]} does not reach 1.0"
            )
            signals = {r[3] for r in bins} - {"(all)"}
            assert 1 <= len(signals) <= 5, query.says(f"top signals of {robot}'s alert in cycle {alert[5]}")
        for signal, cells in shown.items():
            assert all(0 <= v <= total[t] + 1e-9 for t, v in cells.items()), query.says(
                f"{signal} of {robot} above the (all) row or outside [0, 1]"
            )


def test_alert_rule_is_over_threshold_exactly_in_minutes_with_flagged_windows(
    cell: Cell, influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    query = find(RULES_FILE.name, 'rule "Robot anomaly score over threshold"')
    series = run(influx, datasource, query, interpolate(query.text, ROBOTS, multi=False))
    minute = 60 * 10**9
    for s in series:
        robot = s["tags"]["robot"]
        over = {t for t, value in s["values"] if value is not None and value > 1}
        flagged = buckets([w[0] for w in cell.scores[robot] if w[3]], minute)
        assert over == flagged, query.says("the rule's threshold (> 1) and the daemon's is_anomaly disagree")
        assert over, query.says(f"the rule would fire for {robot}")


def test_alert_firing_rule_fires_exactly_for_robots_with_an_open_daemon_alert(
    influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    """The daemon's own alert lifecycle as the rule sees it: the alert points are written by the daemon's
    own encoder (one point per alert at its start, rewritten at each event), an open alert on one robot,
    a resolved one on another, and one that fired and then resolved on a third. Camera alerts are alert
    instances of their own (robot and camera): a camera alert that started after a robot's open signal
    alert and resolved does not hide the open one, and an open camera alert fires for its camera."""
    from daemon.alerts import Alert
    from daemon.pipeline import alert_point

    query = find(RULES_FILE.name, 'rule "cellwatch alert firing"')
    db = "alert_states"
    create_db(influx, db)
    now = TO_MS * MS - 60 * 10**9  # inside the evaluated range
    s = 10**9

    def alert(robot: str, start: int, end: int | None) -> Alert:
        return Alert(robot, start, 3.0, start, 1, last_ns=start + 5 * s, end_ns=end, windows=5)

    points = [
        alert_point(alert("open", now - 600 * s, None), "m"),
        alert_point(alert("closed", now - 900 * s, now - 800 * s), "m"),
        alert_point(alert("flapped", now - 300 * s, None), "m"),  # fired ...
        alert_point(alert("flapped", now - 300 * s, now - 200 * s), "m"),  # ... then resolved: rewritten
        alert_point(alert("again", now - 3000 * s, now - 2900 * s), "m"),  # an older alert, resolved
        alert_point(alert("again", now - 100 * s, None), "m"),  # and a newer one, firing
        # an open signal alert, and a camera alert of the same robot that started later and resolved
        alert_point(alert("both", now - 700 * s, None), "m"),
        camera_alert_point(
            "both", "cam1", CameraAlert(now - 500 * s, now - 450 * s, 3.0, "f", "o.png", "t", 5)
        ),
        # a camera alert open while the robot's signals are fine
        alert_point(alert("camonly", now - 900 * s, now - 850 * s), "m"),
        camera_alert_point(
            "camonly", "cam2", CameraAlert(now - 50 * s, now - 40 * s, 2.0, "f", "o.png", "t", 5), firing=True
        ),
    ]
    write_points(influx, db, points)
    series = run(influx, {**datasource, "database": db}, query, interpolate(query.text, ROBOTS, multi=False))
    firing = {(s["tags"]["robot"], s["tags"].get("camera", "")): s["values"][-1][1] for s in series}
    assert firing == {
        ("open", ""): 1,
        ("closed", ""): 0,
        ("flapped", ""): 0,
        ("again", ""): 1,
        ("both", ""): 1,
        ("both", "cam1"): 0,
        ("camonly", ""): 0,
        ("camonly", "cam2"): 1,
    }, query.says("the last state per robot and camera")
    rules = [r for g in load_yaml(RULES_FILE)["groups"] for r in g["rules"]]
    (rule,) = [r for r in rules if r["uid"] == "cellwatch-alert-firing"]
    condition = {d["refId"]: d for d in rule["data"]}[rule["condition"]]["model"]
    threshold = condition["conditions"][0]["evaluator"]["params"][0]
    assert {key for key, value in firing.items() if value > threshold} == {
        ("open", ""),
        ("again", ""),
        ("both", ""),
        ("camonly", "cam2"),
    }
    assert "$labels.camera" in rule["annotations"]["summary"], "the summary names the camera"


# --- the cameras ---------------------------------------------------------------------------------------
def panel_of(name: str, title: str) -> dict[str, Any]:
    (panel,) = [p for p in all_panels(load_dashboard(name)) if p["title"] == title and p["type"] != "row"]
    return panel


def overlay_links(panel: dict[str, Any]) -> list[str]:
    """The data-link URLs of a table's overlay column."""
    (override,) = [o for o in panel["fieldConfig"]["overrides"] if o["matcher"]["options"] == "overlay"]
    (links,) = [p["value"] for p in override["properties"] if p["id"] == "links"]
    return [link["url"] for link in links]


def max_per_interval(points: list[tuple[int, float]]) -> dict[int, float]:
    out: dict[int, float] = {}
    for time_ns, value in points:
        bucket = time_ns - time_ns % INTERVAL_NS
        out[bucket] = max(out.get(bucket, float("-inf")), value)
    return out


@pytest.mark.parametrize(
    ("name", "title"),
    [
        ("camera.json", "Normalized image score per camera"),
        ("cell-overview.json", "Normalized image score per camera"),
        ("robot-detail.json", "Normalized image score per camera"),
    ],
)
def test_image_score_panels_plot_each_cameras_max_normalized_score_against_the_threshold(
    name: str, title: str, cell: Cell, influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    """Per camera, the highest normalized image score of each interval, with the threshold (1) as a
    dashed red line; the overview's and the robot page's series open the camera dashboard for that
    robot and camera."""
    panel = panel_of(name, title)
    query = find(name, f'panel "{title}"')
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, 1], query.says("the threshold line is not at 1")
    assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "dashed"
    for robots in selections(query):
        series = run(influx, datasource, query, interpolate(query.text, robots, multi=query.multi))
        for s in series:
            key = (s["tags"].get("robot", robots[0]), s["tags"]["camera"])
            expected = max_per_interval([(f.time_ns, f.normalized) for f in cell.frames[key]])
            assert dict(s["values"]) == pytest.approx(expected), query.says(f"the values of {key}")
            assert any(v > 1 for v in expected.values()), "some frames are above the threshold line"
        assert {(s["tags"].get("robot", robots[0]), s["tags"]["camera"]) for s in series} == {
            (r, c) for r in robots for c in CAMERAS[r]
        }, query.says("one series per camera")
    if name != "camera.json":
        (link,) = panel["fieldConfig"]["defaults"]["links"]
        assert link["url"].startswith("/d/cellwatch-camera/"), query.says("no link to the camera dashboard")
        assert "var-camera=${__field.labels.camera}" in link["url"], query.says("the link loses the camera")


def test_overview_counts_anomalous_frames_per_camera(
    cell: Cell, influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    """The overview counts each camera's frames over the threshold in the range."""
    query = find("cell-overview.json", 'panel "Anomalous frames in range"')
    got = rows(run(influx, datasource, query, interpolate(query.text, ROBOTS, multi=True)))
    counts = {(r["robot"], r["camera"]): r["count"] for r in got}
    assert counts == {key: sum(f.is_anomaly for f in frames) for key, frames in cell.frames.items()}


def test_frames_over_the_threshold_table_links_each_frame_to_its_overlay_on_the_daemon(
    cell: Cell, influx: InfluxServer, datasource: dict[str, Any], daemon: str
) -> None:
    """The camera dashboard lists the newest frames over the threshold (camera, score, frame reference,
    sequence number, cycle, overlay); clicking an overlay opens it from the daemon: the link, built as
    Grafana builds it from the Daemon URL variable and the cell, fetches that frame's PNG."""
    name, title = "camera.json", "Latest frames over the threshold"
    query = find(name, f'panel "{title}"')
    (url,) = overlay_links(panel_of(name, title))
    for robot in ROBOTS:
        for cameras in camera_selections(query, (robot,)):
            got = rows(
                run(
                    influx, datasource, query, interpolate(query.text, (robot,), multi=False, cameras=cameras)
                )
            )
            selected = cameras or CAMERAS[robot]
            expected = sorted(
                (f for c in selected for f in cell.frames[(robot, c)] if f.is_anomaly),
                key=lambda f: f.time_ns,
                reverse=True,
            )
            assert [r["time"] for r in got] == [f.time_ns for f in expected], query.says("newest first")
            for row, frame in zip(got, expected, strict=True):
                assert (row["frame"], row["seq"], row["cycle"], row["overlay"]) == (
                    frame.frame,
                    frame.seq,
                    frame.cycle,
                    frame.overlay,
                ), query.says(f"the frame of {robot}")
                assert row["normalized_score"] == pytest.approx(frame.normalized)
                assert row["normalized_score"] > 1
            for row in got:
                status, kind, body = fetch(interpolate_link(url, daemon, row["overlay"]))
                assert (status, kind) == (200, "image/png"), query.says(f"the overlay link of {row['frame']}")
                assert body == (cell.overlays / row["overlay"]).read_bytes()


def test_latest_overlay_panel_shows_each_cameras_newest_overlay_from_the_daemon(
    cell: Cell, influx: InfluxServer, datasource: dict[str, Any], daemon: str
) -> None:
    """One image per camera (the text panel repeated by the camera picker): its <img> and link, rendered
    as Grafana renders the panel for each camera the picker lists, fetch the camera's newest overlay
    (latest/ROBOT_CAMERA.png) from the daemon; the image URL changes with the time range, so each
    dashboard refresh reloads it."""
    dashboard = load_dashboard("camera.json")
    panel = panel_of("camera.json", "Latest overlay: $camera")
    camera_picker = find("camera.json", "variable $camera")
    content = panel["options"]["content"]
    for robot in ROBOTS:
        listed = rows(
            run(
                influx,
                {"url": influx.url, "database": cell.db},
                camera_picker,
                interpolate(camera_picker.text, (robot,), multi=False),
            )
        )
        for camera in [r["value"] for r in listed]:
            html = interpolate_text(content, robot, camera, daemon)
            assert "$" not in html, f"variables left in the panel: {html}"
            sources = re.findall(r'<img[^>]* src="([^"]+)"', html)
            links = re.findall(r'<a[^>]* href="([^"]+)"', html)
            assert len(sources) == 1, html
            assert len(links) == 1, html
            assert f"t={TO_MS}" in sources[0], "the image URL does not change with the time range"
            newest = max((f for f in cell.frames[(robot, camera)] if f.overlay), key=lambda f: f.time_ns)
            for url in (sources[0], links[0]):
                status, kind, body = fetch(url)
                assert (status, kind) == (200, "image/png"), f"{url} for {robot} {camera}"
                assert body == (cell.overlays / newest.overlay).read_bytes(), f"{url}: not the newest overlay"
    assert variable(dashboard, "daemon") is not None


def test_camera_alerts_table_gives_each_alerts_peak_frame_and_overlay(
    cell: Cell, influx: InfluxServer, datasource: dict[str, Any], daemon: str
) -> None:
    """The camera alerts (alert measurement, kind camera) of the selected cameras, newest first: state,
    peak score, the frame that peaked and its overlay, which opens from the daemon."""
    name, title = "camera.json", "Camera alerts"
    query = find(name, f'panel "{title}"')
    (url,) = overlay_links(panel_of(name, title))
    for robot in ROBOTS:
        got = rows(run(influx, datasource, query, interpolate(query.text, (robot,), multi=False)))
        expected = sorted(
            ((c, a) for c in CAMERAS[robot] for a in cell.camera_alerts[(robot, c)]),
            key=lambda ca: ca[1].start_ns,
            reverse=True,
        )
        assert [(r["time"], r["camera"]) for r in got] == [(a.start_ns, c) for c, a in expected]
        for row, (_, alert) in zip(got, expected, strict=True):
            assert (row["state"], row["frame"], row["overlay"], row["windows"]) == (
                "resolved",
                alert.frame,
                alert.overlay,
                alert.frames,
            ), query.says(robot)
            assert row["peak_score"] == pytest.approx(alert.peak_score)
            assert row["duration_s"] == pytest.approx((alert.end_ns - alert.start_ns) / 1e9)
            status, kind, _ = fetch(interpolate_link(url, daemon, row["overlay"]))
            assert (status, kind) == (200, "image/png"), query.says(f"the overlay of {robot}'s alert")


def test_fused_cycle_views_show_signal_and_camera_scores_and_what_fired(
    cell: Cell, influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    """Per cycle, the signal model's score next to the camera's (highest per interval, per camera); the
    cycles each sensor flagged alone or both together; and every cycle with what fired."""
    name = "camera.json"
    signal = find(name, 'panel "Signal and camera score per cycle" query A')
    camera = find(name, 'panel "Signal and camera score per cycle" query B')
    counts = {ref: find(name, f'panel "Cycles flagged, by what fired" query {ref}') for ref in "ABC"}
    table = find(name, 'panel "Fused cycles"')
    for robot in ROBOTS:
        for query, column, field in (
            (signal, "signal score", "signal_score"),
            (camera, "camera score", "camera_score"),
        ):
            series = run(influx, datasource, query, interpolate(query.text, (robot,), multi=False))
            for s in series:
                assert s["columns"] == ["time", column], query.says("the column")
                key = (robot, s["tags"]["camera"])
                expected = max_per_interval([(c.time_ns, getattr(c, field)) for c in cell.fused[key]])
                assert dict(s["values"]) == pytest.approx(expected), query.says(f"{field} of {key}")
        for ref, kind in zip("ABC", ("signals", "camera", "both"), strict=True):
            query = counts[ref]
            got = rows(run(influx, datasource, query, interpolate(query.text, (robot,), multi=False)))
            assert {r["camera"]: r["count"] for r in got} == {
                c: sum(f.fired == kind for f in cell.fused[(robot, c)]) for c in CAMERAS[robot]
            }, query.says(f"cycles where {kind} fired, {robot}")
        got = rows(run(influx, datasource, table, interpolate(table.text, (robot,), multi=False)))
        cycles = sorted((f for c in CAMERAS[robot] for f in cell.fused[(robot, c)]), key=lambda f: -f.time_ns)
        assert [
            (r["time"], r["cycle"], r["fired"], r["signal_anomaly"], r["camera_anomaly"]) for r in got
        ] == [(f.time_ns, f.cycle, f.fired, f.signal_anomaly, f.camera_anomaly) for f in cycles], table.says(
            robot
        )
    panel = panel_of(name, "Fused cycles")
    (override,) = [o for o in panel["fieldConfig"]["overrides"] if o["matcher"]["options"] == "fired"]
    (mapping,) = [p["value"] for p in override["properties"] if p["id"] == "mappings"]
    assert set(mapping[0]["options"]) == {"none", "signals", "camera", "both"}, (
        "every value of fired has a colour"
    )


# --- the files are valid provisioning ------------------------------------------------------------------
@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_dashboard_json_is_a_valid_provisioned_dashboard(name: str) -> None:
    dashboard = load_dashboard(name)
    assert dashboard["uid"].startswith("cellwatch-"), f"{name}: uid {dashboard['uid']}"
    assert dashboard["title"], f"{name}: no title"
    assert dashboard.get("id") is None, f"{name}: a provisioned dashboard has no database id"
    assert 36 <= dashboard["schemaVersion"] <= 41, name
    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"{name}: panel ids repeat: {ids}"
    uids = {load_dashboard(n)["uid"] for n in DASHBOARD_FILES}
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f'{name}: panel "{panel["title"]}" is wider than the grid'
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f'{name}: panel "{panel["title"]}" overlaps another'
        cells |= area
        if panel["type"] == "row":
            continue
        if panel["type"] == "text":  # the latest overlay per camera: HTML, no query
            assert panel["options"]["mode"] == "html", f'{name}: panel "{panel["title"]}" mode'
            assert panel["repeat"] == "camera", f'{name}: panel "{panel["title"]}" is not one per camera'
            assert "targets" not in panel, f'{name}: panel "{panel["title"]}" has a query it never runs'
            continue
        assert panel["datasource"]["uid"] == DATASOURCE_UID, f'{name}: panel "{panel["title"]}" datasource'
        assert panel["targets"], f'{name}: panel "{panel["title"]}" has no query'
        for target in panel["targets"]:
            where = f'{name}: panel "{panel["title"]}" query {target["refId"]}'
            assert target["datasource"] == {"type": "influxdb", "uid": DATASOURCE_UID}, where
            assert target["rawQuery"] is True, f"{where}: Grafana would build the query from the editor"
            assert ROBOT_FILTER in target["query"], f"{where}: not filtered by the robot picker"
            if variable(dashboard, "camera"):
                assert CAMERA_FILTER in target["query"], f"{where}: not filtered by the camera picker"
            if name == "robot-detail.json" and 'FROM "alert"' in target["query"]:  # peak, top signals,
                assert "\"camera\" = ''" in target["query"], f"{where}: shows camera alerts"  # localization
        field_config = panel.get("fieldConfig", {})
        links = list(field_config.get("defaults", {}).get("links", []))
        for override in field_config.get("overrides", []):
            for prop in override["properties"]:
                links += prop["value"] if prop["id"] == "links" else []
        for link in links:
            where = f'{name}: panel "{panel["title"]}" links to {link["url"]}'
            if link["url"].startswith("${daemon"):  # an overlay, from the daemon (data links percent-encode
                assert link["url"] == "${daemon:raw}/overlays/${__value.raw}", where  # ${daemon} otherwise)
                assert link.get("targetBlank") is True, f"{where}: opens in the dashboard's tab"
                continue
            uid = re.match(r"/d/([\w-]+)/", link["url"])
            assert uid, where
            assert uid.group(1) in uids, where

    robot = robot_variable(dashboard)
    assert robot["datasource"]["uid"] == DATASOURCE_UID, f"{name}: $robot datasource"
    measurement = IMAGE_SCORE_MEASUREMENT if name == "camera.json" else "anomaly_score"
    assert variable_query(robot) == f'SHOW TAG VALUES FROM "{measurement}" WITH KEY = "robot"', name
    overview = name == "cell-overview.json"
    assert (robot["multi"], robot["includeAll"]) == (overview, overview), f"{name}: $robot selection"
    camera = variable(dashboard, "camera")
    if camera is not None:  # several cameras, or All: the cameras of the chosen robot
        assert camera["datasource"]["uid"] == DATASOURCE_UID, f"{name}: $camera datasource"
        assert variable_query(camera) == (
            f'SHOW TAG VALUES FROM "{IMAGE_SCORE_MEASUREMENT}" WITH KEY = "camera" WHERE {ROBOT_FILTER}'
        ), name
        assert (camera["multi"], camera["includeAll"]) == (True, True), f"{name}: $camera selection"
    daemon = variable(dashboard, "daemon")
    if name == "camera.json":
        assert daemon is not None, f"{name}: no Daemon URL variable"
        assert (daemon["type"], daemon["query"]) == ("textbox", DEFAULT_DAEMON_URL), f"{name}: $daemon"
        assert daemon["current"]["value"] == DEFAULT_DAEMON_URL, f"{name}: $daemon default"
    (annotation,) = [a for a in dashboard["annotations"]["list"] if not a.get("builtIn")]
    target = annotation.get("target") or annotation
    assert annotation["datasource"]["uid"] == DATASOURCE_UID, f"{name}: annotation datasource"
    assert ROBOT_FILTER in target["query"], f"{name}: annotation not filtered by the robot picker"
    for column in ("textColumn", "timeEndColumn", "tagsColumn"):
        assert f'"{target[column]}"' in target["query"], f"{name}: annotation {column} is not selected"


def test_dashboard_uids_and_titles_are_distinct() -> None:
    dashboards = [load_dashboard(name) for name in DASHBOARD_FILES]
    assert len({d["uid"] for d in dashboards}) == len({d["title"] for d in dashboards}) == len(dashboards)


def test_datasource_takes_address_and_credentials_from_the_environment(
    datasource: dict[str, Any], influx: InfluxServer, cell: Cell
) -> None:
    provisioning = load_yaml(DATASOURCE_FILE)
    assert provisioning["apiVersion"] == 1
    (source,) = provisioning["datasources"]
    assert (source["uid"], source["type"], source["access"]) == (DATASOURCE_UID, "influxdb", "proxy")
    assert source["jsonData"]["version"] == "InfluxQL"
    for key, value in (
        ("url", source["url"]),
        ("user", source["user"]),
        ("dbName", source["jsonData"]["dbName"]),
    ):
        assert re.fullmatch(r"\$\{\w+\}|\$__env\{\w+\}", value), f"{DATASOURCE_FILE.name}: {key} is {value!r}"
    # the password only as a secure field, and only from the environment or a file: never a literal
    assert set(source["secureJsonData"]) == {"password"}
    assert source["secureJsonData"]["password"] in (f"${{{PASSWORD_ENV}}}", f"$__env{{{PASSWORD_ENV}}}")
    plain = json.dumps({k: v for k, v in source.items() if k != "secureJsonData"}).lower()
    for secret in ("password", "token"):
        assert secret not in plain, f"{DATASOURCE_FILE.name}: a {secret} outside secureJsonData"
    readme = (DASHBOARDS / "README.md").read_text()
    for name in (*DATASOURCE_ENV, PASSWORD_ENV):
        assert name in readme, f"dashboards/README.md does not document {name}"
    # with the environment pointing at the daemon's InfluxDB, the datasource reaches what it wrote
    assert datasource["url"] == influx.url
    assert datasource["database"] == cell.db
    shown = influx.series("SHOW MEASUREMENTS", datasource["database"])
    assert sorted(m[0] for m in shown) == [
        "alert",
        "anomaly_score",
        "cycle_fused",
        "image_score",
        "localization",
    ]


def test_dashboard_provider_loads_the_dashboards_into_the_cellwatch_folder() -> None:
    (provider,) = load_yaml(PROVIDER_FILE)["providers"]
    assert (provider["type"], provider["folder"]) == ("file", "cellwatch")
    path = provider["options"]["path"]
    assert path == "/var/lib/grafana/dashboards/cellwatch"
    readme = (DASHBOARDS / "README.md").read_text()
    assert path in readme, "the README says where to copy the dashboards"
    install = next(
        line for line in readme.splitlines() if line.startswith("sudo install") and ".json" in line
    )
    for name in DASHBOARD_FILES:
        assert f"dashboards/{name}" in install, f"the README's install line does not copy {name}"


def test_alert_rules_reference_the_datasource_a_threshold_of_one_and_a_dashboard_panel() -> None:
    provisioning = load_yaml(RULES_FILE)
    assert provisioning["apiVersion"] == 1
    (group,) = provisioning["groups"]
    assert group["folder"] == "cellwatch"
    assert group["interval"] == "1m"
    for rule in group["rules"]:
        where = f'{RULES_FILE.name}: rule "{rule["title"]}"'
        data = {d["refId"]: d for d in rule["data"]}
        assert rule["condition"] in data, f"{where}: condition {rule['condition']} is not a query"
        assert rule["for"] in ("0s", "1m"), where
        assert rule["labels"]["severity"], f"{where}: no severity label"
        for item in data.values():
            assert item["datasourceUid"] in (DATASOURCE_UID, "__expr__"), where
            model = item["model"]
            if item["datasourceUid"] == DATASOURCE_UID:
                assert model["rawQuery"] is True, where
                assert "$timeFilter" in model["query"], f"{where}: not limited to the evaluated range"
            else:
                assert model["expression"] in data, f"{where}: {item['refId']} reads a missing query"
        condition = data[rule["condition"]]["model"]
        assert condition["type"] == "threshold", where
        # the score rule: over the threshold (normalized 1); the lifecycle rule: the field firing = 1
        limit = 1 if "anomaly_score" in data["A"]["model"]["query"] else 0
        assert condition["conditions"][0]["evaluator"] == {"type": "gt", "params": [limit]}, where
        dashboards = {d["uid"]: d for d in map(load_dashboard, DASHBOARD_FILES)}
        linked = rule["annotations"]["__dashboardUid__"]
        assert linked in dashboards, f"{where}: links to dashboard {linked}, which is not provisioned here"
        panel_ids = {str(p["id"]) for p in all_panels(dashboards[linked])}
        assert rule["annotations"]["__panelId__"] in panel_ids, f"{where}: linked panel does not exist"


def test_no_provisioning_file_holds_a_literal_secret() -> None:
    for path in PROVISIONING.rglob("*.yaml"):
        text = path.read_text()
        assert not re.search(r"(password|token):\s*[^$\s]", text, re.IGNORECASE), (
            f"{path.name}: literal secret"
        )
