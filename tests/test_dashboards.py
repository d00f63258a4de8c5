"""The Grafana provisioning in dashboards/, against what `cellwatch run` writes into the real InfluxDB.

Grafana itself is not installed here, so the test does what Grafana does with these files: it expands
the datasource's environment variables, interpolates every query the way Grafana's InfluxDB (InfluxQL)
datasource does (``$timeFilter`` as ``time >= <from>ms and time <= <to>ms``, ``$__interval``, ``$robot``
regex-escaped, several robots as ``(a|b)``) and runs it against InfluxDB 1.6.7 holding a simulated
two-robot cell replayed through the daemon. Every panel, template-variable, annotation and alert-rule
query must run and return the series the daemon wrote, for the robots selected.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml
from services import InfluxServer
from test_influx_sink import create_db

from daemon.cli import main
from ingest.sim.dataset import write_recording
from ingest.sim.scenarios import plan_recording

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
PROVISIONING = DASHBOARDS / "provisioning"
DATASOURCE_FILE = PROVISIONING / "datasources" / "cellwatch.yaml"
PROVIDER_FILE = PROVISIONING / "dashboards" / "cellwatch.yaml"
RULES_FILE = PROVISIONING / "alerting" / "cellwatch-rules.yaml"
DASHBOARD_FILES = ("cell-overview.json", "robot-detail.json")
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


# --- what Grafana does with the files ------------------------------------------------------------------
def grafana_escape_regex(value: str) -> str:
    """@grafana/data escapeRegex, which the InfluxDB datasource applies to variables used in a regex."""
    return re.sub(r"[\\^$*+?.()|\[\]{}/]", lambda m: "\\" + m.group(0), value)


def interpolate(text: str, robots: tuple[str, ...], *, multi: bool) -> str:
    """A query as Grafana sends it to InfluxDB for the dashboard time range and these selected robots."""
    if multi and len(robots) > 1:  # a multi-value variable: escaped values joined into a group
        value = "(" + "|".join(grafana_escape_regex(r) for r in robots) + ")"
    else:
        value = grafana_escape_regex(robots[0])
    text = text.replace("$timeFilter", f"time >= {FROM_MS}ms and time <= {TO_MS}ms")
    text = text.replace("$__interval_ms", str(INTERVAL_NS // MS)).replace("$__interval", INTERVAL)
    text = text.replace("$interval", INTERVAL)
    return re.sub(r"\$\{robot(?::\w+)?\}|\$robot\b|\[\[robot\]\]", lambda _: value, text)


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


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)  # newer Grafana saves an object


def dashboard_queries(name: str) -> list[Query]:
    dashboard = load_dashboard(name)
    multi = bool(robot_variable(dashboard).get("multi"))
    out = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            where = f'panel "{panel["title"]}" query {target["refId"]}'
            out.append(Query(name, where, target["query"], multi))
    for variable in dashboard["templating"]["list"]:
        out.append(Query(name, f"variable ${variable['name']}", variable_query(variable), multi))
    for annotation in dashboard["annotations"]["list"]:
        if not annotation.get("builtIn"):
            target = annotation.get("target") or annotation
            out.append(Query(name, f'annotation "{annotation["name"]}"', target["query"], multi))
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


def selections(query: Query) -> list[tuple[str, ...]]:
    """Robot selections to run a query for: all and one robot where several can be picked, else each."""
    if "$robot" not in query.text and "${robot" not in query.text:
        return [ROBOTS]
    return [ROBOTS, ROBOTS[1:]] if query.multi else [(robot,) for robot in ROBOTS]


CASES = [
    pytest.param(query, robots, id=f"{query}, robots={'+'.join(robots)}")
    for query in [q for name in DASHBOARD_FILES for q in dashboard_queries(name)] + rule_queries()
    for robots in selections(query)
]


# --- the cell: replayed through the daemon into InfluxDB -----------------------------------------------
@dataclass(frozen=True)
class Cell:
    db: str
    scores: dict[str, list[list[Any]]]  # robot -> [time_ns, score, normalized, is_anomaly, cycle, threshold]
    # robot -> [start_ns, end_ns, peak_score, top_signals, text, peak_cycle]
    alerts: dict[str, list[list[Any]]]
    localization: dict[str, list[list[Any]]]  # robot -> [time_ns, contribution, peak_cycle, signal]


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
            f"SELECT {alert_fields} FROM alert WHERE robot = '{robot}'", "dashboards"
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
    return Cell("dashboards", scores, alerts, localization)


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
@pytest.mark.parametrize(("query", "robots"), CASES)
def test_query_returns_the_series_written_for_the_selected_robots(
    query: Query, robots: tuple[str, ...], cell: Cell, influx: InfluxServer, datasource: dict[str, Any]
) -> None:
    text = interpolate(query.text, robots, multi=query.multi)
    series = run(influx, datasource, query, text)
    got = rows(series)
    where = f"{query} (robots {', '.join(robots)})\n  query: {text}"

    if text.startswith("SHOW TAG VALUES"):
        assert sorted(r["value"] for r in got) == sorted(ROBOTS), (
            f"{where}: the robot picker lists every robot"
        )
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

    measurement = re.search(r'FROM "(\w+)"', text)
    assert measurement, f"{where}: no measurement"
    if measurement.group(1) == "alert":
        if "last(" in text:  # the lifecycle rule: the newest alert's state, one row per robot
            assert sorted(r["robot"] for r in got) == sorted(robots), f"{where}: one row per robot"
            assert {r["firing"] for r in got} == {0}, f"{where}: the replay ended, every alert resolved"
            return
        alerts = sum(len(cell.alerts[r]) for r in robots)
        assert len(got) == alerts, f"{where}: {len(got)} rows for {alerts} alerts"
        return
    grouped = re.search(r"GROUP BY time\((\d+)([smh])\)", text)
    if measurement.group(1) == "localization":
        check_localization(series, robots, cell, grouped, where)
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
            if panel["type"] != "row":
                title = f'panel "{panel["title"]}" '
                assert any(w.startswith(title) for w in tested), f"{name}: {title}has no query"
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
    columns = ["time", "robot", "state", "peak_score", "top_signals", "duration_s"]
    assert series["columns"] == columns, query.says("the columns")
    times = [row[0] for row in series["values"]]
    assert times == sorted(times, reverse=True), query.says("newest alert first")
    expected = {(a[0], robot, a[2], a[3]) for robot in ROBOTS for a in cell.alerts[robot]}
    got = {(row[0], row[1], row[3], row[4]) for row in series["values"]}
    assert got == expected, query.says("one row per alert")
    # the replay has ended: every alert is resolved
    assert {row[2] for row in series["values"]} == {"resolved"}, query.says("the states")
    assert all(row[5] > 0 for row in series["values"]), query.says("the durations")


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
        got = rows(run(influx, datasource, query, interpolate(query.text, robots, multi=query.multi)))
        alerts = {(a[0], a[4]): a[1] / MS for robot in robots for a in cell.alerts[robot]}
        assert len(got) == len(alerts), query.says("one annotation per alert")
        # an annotation starts at the alert's start, shows its text and ends at timeEnd, which Grafana
        # reads as epoch milliseconds (the time unit it asks InfluxDB for)
        shown = {(r["time"], r[target["textColumn"]]): r[target["timeEndColumn"]] for r in got}
        assert shown == pytest.approx(alerts, abs=0.01), query.says("start, text and end (ms) of each alert")
        assert all(r[target["tagsColumn"]] in robots for r in got), query.says("tagged with the robot")


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
    a resolved one on another, and one that fired and then resolved on a third."""
    from daemon.alerts import Alert
    from daemon.pipeline import alert_point
    from daemon.sinks.lineprotocol import encode_batch

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
    ]
    request = urllib.request.Request(
        f"{influx.url}/write?db={db}&precision=ns", data=encode_batch(points), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 204
    series = run(influx, {**datasource, "database": db}, query, interpolate(query.text, ROBOTS, multi=False))
    firing = {s["tags"]["robot"]: s["values"][-1][1] for s in series}
    assert firing == {"open": 1, "closed": 0, "flapped": 0, "again": 1}, query.says("the last state")
    rules = [r for g in load_yaml(RULES_FILE)["groups"] for r in g["rules"]]
    (rule,) = [r for r in rules if r["uid"] == "cellwatch-alert-firing"]
    condition = {d["refId"]: d for d in rule["data"]}[rule["condition"]]["model"]
    threshold = condition["conditions"][0]["evaluator"]["params"][0]
    assert {robot for robot, value in firing.items() if value > threshold} == {"open", "again"}


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
        assert panel["datasource"]["uid"] == DATASOURCE_UID, f'{name}: panel "{panel["title"]}" datasource'
        assert panel["targets"], f'{name}: panel "{panel["title"]}" has no query'
        for target in panel["targets"]:
            where = f'{name}: panel "{panel["title"]}" query {target["refId"]}'
            assert target["datasource"] == {"type": "influxdb", "uid": DATASOURCE_UID}, where
            assert target["rawQuery"] is True, f"{where}: Grafana would build the query from the editor"
            assert ROBOT_FILTER in target["query"], f"{where}: not filtered by the robot picker"
        for link in panel.get("fieldConfig", {}).get("defaults", {}).get("links", []):
            uid = re.match(r"/d/([\w-]+)/", link["url"])
            assert uid, f'{name}: panel "{panel["title"]}" links to {link["url"]}'
            assert uid.group(1) in uids, f'{name}: panel "{panel["title"]}" links to {link["url"]}'

    variable = robot_variable(dashboard)
    assert variable["datasource"]["uid"] == DATASOURCE_UID, f"{name}: $robot datasource"
    assert variable_query(variable) == 'SHOW TAG VALUES FROM "anomaly_score" WITH KEY = "robot"', name
    overview = name == "cell-overview.json"
    assert (variable["multi"], variable["includeAll"]) == (overview, overview), f"{name}: $robot selection"
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
    assert sorted(m[0] for m in shown) == ["alert", "anomaly_score", "localization"]


def test_dashboard_provider_loads_the_dashboards_into_the_cellwatch_folder() -> None:
    (provider,) = load_yaml(PROVIDER_FILE)["providers"]
    assert (provider["type"], provider["folder"]) == ("file", "cellwatch")
    path = provider["options"]["path"]
    assert path == "/var/lib/grafana/dashboards/cellwatch"
    assert path in (DASHBOARDS / "README.md").read_text(), "the README says where to copy the dashboards"


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
