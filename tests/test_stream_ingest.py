"""Kafka and MQTT ingest end to end, against real brokers (Tansu, Mosquitto) and the real InfluxDB:
the load generator publishes a recording as several robots, the daemon (a subprocess) scores it, and the
tests read back what the sinks wrote.

Each daemon writes every point to two sinks: InfluxDB and a JSON-lines file sink of its own. What is
claimed, and how it is checked:

- **The final series is exact** (InfluxDB): the set of (robot, timestamp) of the stored scores equals
  the set the recording defines, and each stored score equals the score of the same cycle computed
  directly from the file (so a window assembled from messages is the cycle itself, never a truncated or
  doubled one). InfluxDB merges points with equal timestamps, so it cannot show a duplicate.
- **How often each window was scored and written** is counted in the file sinks, which append every
  point: without a crash or a redelivery, every window appears exactly once across the files. Where
  messages are legitimately delivered again (SIGKILL of the daemon, a broker restart, a rebalance) the
  promise is at-least-once: every window at least once, at most once per daemon process (a redelivery
  to the same process is rejected as a duplicate), and the windows written twice are counted and
  printed (`pytest -rP` shows them).
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from brokers import Committed, MosquittoServer, TansuServer
from daemons import Daemon
from services import InfluxServer, wait_until

from ingest.loadgen import Target, plan, publish, robot_ids

pytestmark = pytest.mark.slow
T0 = 1_714_543_200_000_000_000  # 2024-05-01 06:00 UTC: fixed, so expected timestamps are known


@pytest.fixture(scope="module")
def reference_scores(tiny_cell_and_model: tuple[Path, Path]) -> dict[int, float]:
    """Cycle id -> score of that test cycle, computed directly from the file (no daemon, no broker)."""
    from flows.artifact import load_model
    from flows.preprocess import downsample
    from flows.scorer import Scorer
    from ingest.voraus.reader import VorausReader

    cell, model_dir = tiny_cell_and_model
    model = load_model(model_dir)
    scorer = Scorer(model, device="cpu")
    divider = int(model.card.training.get("rate_divider", 1))
    out = {}
    with VorausReader(cell, model.card.signals) as reader:
        for cycle in reader.cycles():
            if cycle.is_train:
                continue
            x = scorer.prepare_cycle(np.asarray(downsample(cycle.signals, divider), dtype=np.float32))
            out[cycle.sample] = float(scorer.score(x[None]).raw[0])
    return out


def expected_windows(
    cell: Path, robots: list[str], start_ns: int = T0, **kw: Any
) -> dict[tuple[str, int], int]:
    """(robot, time of the cycle's last sample) -> cycle id, for every cycle the generator sends."""
    return {
        (b.robot, b.end_ns): int(b.cycle or 0)
        for b in plan(cell, robots, start_ns=start_ns, **kw)
        if b.cycle_end
    }


def send(
    url: str, cell: Path, robots: list[str], *, speed: float = math.inf, fmt: str = "json", **kw: Any
) -> int:
    stats = asyncio.run(
        publish(Target.parse(url), plan(cell, robots, start_ns=T0, **kw), fmt=fmt, speed=speed)
    )
    return stats.messages


def stored(influx: InfluxServer, db: str) -> dict[tuple[str, int], tuple[float, int]]:
    """(robot, time) -> (score, cycle) of every stored anomaly score."""
    result = influx.query('SELECT "score", "cycle", "robot" FROM "anomaly_score"', db)["results"][0]
    assert "error" not in result, result
    rows = result["series"][0]["values"] if result.get("series") else []
    return {(robot, int(t)): (float(score), int(cycle)) for t, score, cycle, robot in rows}


def wait_stored(influx: InfluxServer, db: str, count: int, timeout: float, daemons: list[Daemon]) -> None:
    def enough() -> bool:
        for d in daemons:
            assert d.alive, f"daemon {d.name} died: {d.log_tail()}"
        return len(stored(influx, db)) >= count

    try:
        wait_until(enough, timeout, f"{count} scores in {db}", interval=0.2)
    except TimeoutError as err:
        state = {d.name: {k: v for k, v in (d.metrics() or {}).items() if "python" not in k} for d in daemons}
        raise AssertionError(f"{err}: {len(stored(influx, db))} stored; daemons: {state}") from None


def assert_exactly_once(
    got: dict[tuple[str, int], tuple[float, int]],
    expected: dict[tuple[str, int], int],
    reference: dict[int, float],
) -> None:
    assert set(got) == set(expected), (
        f"missing {sorted(set(expected) - set(got))[:5]}, unexpected {sorted(set(got) - set(expected))[:5]}"
    )
    for key, (score, cycle) in got.items():
        assert cycle == expected[key]
        assert score == pytest.approx(reference[cycle], rel=1e-3, abs=1e-3), (key, cycle)


def written(path: Path, *, crashed: bool = False) -> Counter[tuple[str, int]]:
    """(robot, time) of every anomaly score the file sink at `path` wrote, with how often it did.

    A daemon killed with SIGKILL may leave its last line unfinished (its points were not acknowledged,
    so they are delivered again): with `crashed`, an unterminated last line is ignored."""
    if not path.exists():
        return Counter()
    text = path.read_text()
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    assert crashed or tail == "", f"{path} ends in an unfinished line: {tail[:80]!r}"
    assert not path.with_name(path.name + ".1").exists(), "rotated: the count would miss lines"
    points = [json.loads(line) for line in lines]
    return Counter((p["robot"], p["time_ns"]) for p in points if p["measurement"] == "anomaly_score")


def scores_file(cfg: dict[str, Any]) -> Path:
    return Path(cfg["sinks"]["file"]["path"])


def with_scores_file(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """The same config writing to a file sink of its own (one file per daemon process)."""
    return {**cfg, "sinks": {**cfg["sinks"], "file": {"path": str(path)}}}


def difference(got: Any, expected: Any) -> str:
    return (
        f"missing {sorted(set(expected) - set(got))[:5]}, unexpected {sorted(set(got) - set(expected))[:5]}"
    )


def assert_written_once(counts: Counter[tuple[str, int]], expected: dict[tuple[str, int], int]) -> None:
    """Every expected window written exactly once, nothing else."""
    assert set(counts) == set(expected), difference(counts, expected)
    twice = {k: n for k, n in counts.items() if n > 1}
    assert not twice, f"{len(twice)} windows written more than once, e.g. {sorted(twice.items())[:5]}"


def assert_written_at_least_once(
    per_process: list[Counter[tuple[str, int]]], expected: dict[tuple[str, int], int], what: str
) -> int:
    """At-least-once across processes, at most once within each; returns (and prints) how many
    windows were written more than once."""
    for counts in per_process:
        twice = {k: n for k, n in counts.items() if n > 1}
        assert not twice, f"one process wrote {len(twice)} windows twice, e.g. {sorted(twice.items())[:5]}"
    total: Counter[tuple[str, int]] = sum(per_process, Counter())
    assert set(total) == set(expected), difference(total, expected)
    again = sorted(k for k, n in total.items() if n > 1)
    print(f"{what}: {len(again)} of {len(expected)} windows written twice (redelivered): {again[:10]}")
    return len(again)


def config(model: Path, influx: InfluxServer, db: str, root: Path, source: dict[str, Any]) -> dict[str, Any]:
    influx.create_database(db)
    return {
        "sources": [source],
        "model": {"path": str(model)},
        "sinks": {
            "influxdb": {
                "url": influx.url,
                "database": db,
                "spool_dir": str(root / f"spool-{db}"),
                "flush_interval_ms": 100,
                "timeout_s": 5,
            },
            # every point goes to every sink: the file counts what InfluxDB's merging would hide
            "file": {"path": str(root / f"scores-{db}.jsonl")},
        },
        "state_dir": str(root),
        "stop_drain_s": 30,
    }


def kafka_source(tansu: TansuServer, topic: str, group: str, **kw: Any) -> dict[str, Any]:
    return {
        "type": "kafka",
        "bootstrap": [tansu.bootstrap],
        "topic": topic,
        "group": group,
        "session_timeout_ms": 6000,
        **kw,
    }


def mqtt_source(mosquitto: MosquittoServer, prefix: str, client_id: str, **kw: Any) -> dict[str, Any]:
    return {
        "type": "mqtt",
        "host": "127.0.0.1",
        "port": mosquitto.port,
        "topic": f"{prefix}/+/signals",
        "client_id": client_id,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
        **kw,
    }


def unique(stem: str) -> str:
    return f"{stem}_{uuid.uuid4().hex[:8]}"


# -- end to end ---------------------------------------------------------------------------------------


def test_kafka_publish_to_influx_every_window_once(
    tansu: TansuServer,
    influx: InfluxServer,
    tiny_cell_and_model: tuple[Path, Path],
    reference_scores: dict[int, float],
    tmp_path: Path,
) -> None:
    """The load generator's CLI publishes two robots (JSON); the daemon scores every cycle of each once."""
    import subprocess

    from daemons import CELLWATCH

    cell, model = tiny_cell_and_model
    topic, db, group = unique("signals"), unique("kafka_e2e"), unique("g")
    tansu.create_topic(topic, 4)
    robots = robot_ids(2)
    cfg = config(model, influx, db, tmp_path, kafka_source(tansu, topic, group))
    daemon = Daemon(tmp_path, "d", cfg)
    daemon.start()
    try:
        to = f"kafka://{tansu.bootstrap}/{topic}"
        result = subprocess.run(
            [
                str(CELLWATCH),
                "publish",
                str(cell),
                "--to",
                to,
                "--robots",
                "2",
                "--speed",
                "inf",
                "--start",
                str(T0),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        expected = expected_windows(cell, robots, spread_s=10.0)  # the CLI's default spread
        wait_stored(influx, db, len(expected), 90, [daemon])
        assert daemon.metric("cellwatch_rejects_total") == 0
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert_exactly_once(stored(influx, db), expected, reference_scores)
    assert_written_once(written(scores_file(cfg)), expected)

    # every message is committed once its window is written: the broker holds, as the group's position
    # on each partition, the number of messages sent to it (a restarted daemon would read nothing again;
    # counted from the plan, since Tansu's ListOffsets answers less than the log end here)
    from aiokafka.partitioner import DefaultPartitioner

    partitioner, partitions = DefaultPartitioner(), list(range(4))
    sent = Counter(
        partitioner(b.robot.encode(), partitions, partitions)
        for b in plan(cell, robots, start_ns=T0, spread_s=10.0)
    )
    want: dict[int, int | None] = {p: sent.get(p) for p in partitions}

    async def positions() -> dict[int, int | None]:
        async with Committed(tansu.bootstrap, group, topic) as committed:
            return await committed.wait_for(want, 30)

    assert sum(sent.values()) > 0
    assert asyncio.run(positions()) == want


def test_mqtt_publish_to_influx_every_window_once(
    mosquitto: MosquittoServer,
    influx: InfluxServer,
    tiny_cell_and_model: tuple[Path, Path],
    reference_scores: dict[int, float],
    tmp_path: Path,
) -> None:
    """Three robots over MQTT in the compact Arrow form; every cycle scored once."""
    cell, model = tiny_cell_and_model
    prefix, db = unique("cell"), unique("mqtt_e2e")
    robots = robot_ids(3)
    source = mqtt_source(mosquitto, prefix, unique("cw"))
    cfg = config(model, influx, db, tmp_path, source)
    # and the scores published back, as retained state per robot
    cfg["sinks"]["mqtt"] = {
        "host": "127.0.0.1",
        "port": mosquitto.port,
        "score_topic": prefix + "/{robot}/anomaly",
    }
    daemon = Daemon(tmp_path, "d", cfg).start()
    try:
        send(f"mqtt://127.0.0.1:{mosquitto.port}/{prefix}/+/signals", cell, robots, fmt="arrow")
        expected = expected_windows(cell, robots)
        wait_stored(influx, db, len(expected), 90, [daemon])
        wait_until(lambda: daemon.metric("cellwatch_source_unacked") == 0, 30, "all messages acknowledged")
        assert daemon.metric("cellwatch_rejects_total") == 0
        wait_until(
            lambda: daemon.metric("cellwatch_feed_published_total") >= len(expected),
            30,
            "the feed to publish",
        )
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    got = stored(influx, db)
    assert_exactly_once(got, expected, reference_scores)
    assert_written_once(written(scores_file(cfg)), expected)
    retained = asyncio.run(retained_states(mosquitto, f"{prefix}/+/anomaly", len(robots)))
    for robot in robots:
        last = max(t for r, t in expected if r == robot)
        assert retained[f"{prefix}/{robot}/anomaly"]["time_ns"] == last
        assert retained[f"{prefix}/{robot}/anomaly"]["score"] == pytest.approx(got[(robot, last)][0])


async def retained_states(mosquitto: MosquittoServer, topic: str, count: int) -> dict[str, Any]:
    """What a dashboard connecting now sees: the retained message of each topic."""
    import json

    import aiomqtt

    out: dict[str, Any] = {}
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(20):
            async for message in client.messages:
                assert message.retain
                assert isinstance(message.payload, bytes)
                out[str(message.topic)] = json.loads(message.payload)
                if len(out) == count:
                    break
    return out


# -- crashes and restarts -----------------------------------------------------------------------------


class Publisher:
    """The load generator in a thread, paced, so a test can crash things while traffic flows."""

    def __init__(self, url: str, cell: Path, robots: list[str], speed: float, **kw: Any) -> None:
        import threading

        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(url, cell, robots, speed, kw), daemon=True)
        self.thread.start()

    def _run(self, url: str, cell: Path, robots: list[str], speed: float, kw: dict[str, Any]) -> None:
        try:
            send(url, cell, robots, speed=speed, **kw)
        except BaseException as err:  # noqa: BLE001 (re-raised by join())
            self.error = err

    def join(self, timeout: float = 120) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "publisher did not finish"
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("transport", ["kafka", "mqtt"])
def test_sigkill_mid_stream_loses_no_window(
    transport: str,
    tansu: TansuServer,
    mosquitto: MosquittoServer,
    influx: InfluxServer,
    tiny_cell_and_model: tuple[Path, Path],
    reference_scores: dict[int, float],
    tmp_path: Path,
) -> None:
    """SIGKILL the daemon while messages flow, start it again: every window is in the final series
    (Kafka resumes from the committed offsets, MQTT from the persistent session's unacknowledged
    messages, the InfluxDB spool from disk)."""
    cell, model = tiny_cell_and_model
    db = unique(f"kill_{transport}")
    robots = robot_ids(2)
    if transport == "kafka":
        topic, group = unique("signals"), unique("g")
        tansu.create_topic(topic, 4)
        source = kafka_source(tansu, topic, group)
        url = f"kafka://{tansu.bootstrap}/{topic}"
    else:
        prefix = unique("cell")
        source = mqtt_source(mosquitto, prefix, unique("cw"))
        url = f"mqtt://127.0.0.1:{mosquitto.port}/{prefix}/+/signals"
    cfg = config(model, influx, db, tmp_path, source)
    expected = expected_windows(cell, robots)
    first = Daemon(tmp_path, "first", cfg).start()
    second_cfg = with_scores_file(cfg, tmp_path / f"scores-{db}-second.jsonl")
    second = Daemon(tmp_path, "second", second_cfg)
    try:
        publisher = Publisher(url, cell, robots, speed=60.0)
        wait_stored(influx, db, 6, 60, [first])
        if transport == "kafka":  # the broker has some progress to resume from (asked, not assumed)

            async def progress() -> bool:
                async with Committed(tansu.bootstrap, group, topic) as committed:
                    return any([(await committed.offset(p) or 0) > 0 for p in range(4)])

            wait_until(lambda: asyncio.run(progress()), 30, "a committed offset", interval=0.1)
        first.kill()  # SIGKILL: no drain, no commit, no PUBACK of what was in flight
        assert len(stored(influx, db)) < len(expected), "the crash came too late to test anything"
        second.start()
        publisher.join()
        wait_stored(influx, db, len(expected), 120, [second])
        assert second.stop() == 0
    finally:
        first.kill()
        second.kill()
    assert_exactly_once(stored(influx, db), expected, reference_scores)
    before = written(scores_file(cfg), crashed=True)
    after = written(scores_file(second_cfg))
    assert 0 < len(before) < len(expected)
    # what the first process wrote but had not acknowledged is delivered again and written twice
    again = assert_written_at_least_once([before, after], expected, f"SIGKILL over {transport}")
    if transport == "kafka":  # the second process resumed from the committed offsets, not from the start
        assert again < len(before)


def test_mqtt_broker_restart_daemon_reconnects(
    mosquitto: MosquittoServer,
    influx: InfluxServer,
    tiny_cell_and_model: tuple[Path, Path],
    reference_scores: dict[int, float],
    tmp_path: Path,
) -> None:
    cell, model = tiny_cell_and_model
    prefix, db = unique("cell"), unique("mqtt_restart")
    robots = robot_ids(2)
    url = f"mqtt://127.0.0.1:{mosquitto.port}/{prefix}/+/signals"
    cfg = config(model, influx, db, tmp_path, mqtt_source(mosquitto, prefix, unique("cw")))
    daemon = Daemon(tmp_path, "d", cfg)
    daemon.start()
    try:
        send(url, cell, robots, max_cycles=10)
        part1 = expected_windows(cell, robots, max_cycles=10)
        wait_stored(influx, db, len(part1), 60, [daemon])
        mosquitto.stop()
        mosquitto.start()  # same port, sessions persisted
        wait_until(
            lambda: daemon.metric("cellwatch_mqtt_reconnects_total") >= 1, 60, "the daemon to reconnect"
        )
        send(url, cell, robots, skip_cycles=10)
        expected = expected_windows(cell, robots)
        wait_stored(influx, db, len(expected), 90, [daemon])
        redelivered = daemon.metric("cellwatch_rejects_total", reason="duplicate")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert_exactly_once(stored(influx, db), expected, reference_scores)
    # the broker may deliver again what was not PUBACKed when it stopped (at-least-once); one process
    # rejects such a redelivery as a duplicate, so its file holds every window exactly once
    print(f"MQTT broker restart: {redelivered:.0f} redelivered messages rejected as duplicates")
    assert_written_once(written(scores_file(cfg)), expected)


def test_kafka_broker_restart_flow_resumes(
    tansu: TansuServer,
    influx: InfluxServer,
    tiny_cell_and_model: tuple[Path, Path],
    reference_scores: dict[int, float],
    tmp_path: Path,
) -> None:
    """Tansu here keeps topics in memory: a restart loses them (and the group's offsets). The daemon
    reconnects by itself, and what is published after the restart is scored."""
    cell, model = tiny_cell_and_model
    topic, db = unique("signals"), unique("kafka_restart")
    robots = robot_ids(2)
    tansu.create_topic(topic, 4)
    url = f"kafka://{tansu.bootstrap}/{topic}"
    cfg = config(model, influx, db, tmp_path, kafka_source(tansu, topic, unique("g")))
    daemon = Daemon(tmp_path, "d", cfg)
    daemon.start()
    try:
        # more before the restart than after: the consumer's old positions lie past the new log's end,
        # so it resets to the earliest offset (whatever the timing) instead of skipping messages
        send(url, cell, robots, max_cycles=26)
        part1 = expected_windows(cell, robots, max_cycles=26)
        wait_stored(influx, db, len(part1), 60, [daemon])
        tansu.stop()
        tansu.start()
        tansu.create_topic(topic, 4)
        send(url, cell, robots, skip_cycles=26)
        expected = expected_windows(cell, robots)
        wait_stored(influx, db, len(expected), 120, [daemon])
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert_exactly_once(stored(influx, db), expected, reference_scores)
    # the restarted broker has a new log (nothing of the old one is delivered again): one process,
    # every window exactly once in its file
    assert_written_once(written(scores_file(cfg)), expected)


def robots_covering_partitions(partitions: int) -> list[str]:
    """Robot ids whose keys land on every partition (Kafka's default murmur2 partitioner)."""
    from aiokafka.partitioner import DefaultPartitioner

    partitioner = DefaultPartitioner()
    for count in range(partitions, 64):
        robots = robot_ids(count)
        hit = {partitioner(r.encode(), list(range(partitions)), list(range(partitions))) for r in robots}
        if len(hit) == partitions:
            return robots
    raise AssertionError("no robot set covers the partitions")


def test_two_daemons_in_one_group_split_the_partitions(
    tansu: TansuServer,
    influx: InfluxServer,
    tiny_cell_and_model: tuple[Path, Path],
    reference_scores: dict[int, float],
    tmp_path: Path,
) -> None:
    cell, model = tiny_cell_and_model
    topic, db, group = unique("signals"), unique("kafka_group"), unique("g")
    tansu.create_topic(topic, 4)
    robots = robots_covering_partitions(4)
    cfg = config(model, influx, db, tmp_path, kafka_source(tansu, topic, group))
    a = Daemon(tmp_path, "a", cfg).start()
    # a second instance: same group, its own spool (one spool directory serves one process)
    other = with_scores_file(cfg, tmp_path / f"scores-{db}-b.jsonl")
    other["sinks"]["influxdb"] = {**cfg["sinks"]["influxdb"], "spool_dir": str(tmp_path / "spool-b")}
    b = Daemon(tmp_path, "b", other).start()
    try:

        def split() -> bool:
            held = [d.metric("cellwatch_kafka_assigned_partitions") for d in (a, b)]
            return sum(held) == 4 and min(held) > 0

        wait_until(split, 90, "the group to split the 4 partitions between both daemons", interval=0.2)
        rebalances = [d.metric("cellwatch_kafka_rebalances_total") for d in (a, b)]
        send(f"kafka://{tansu.bootstrap}/{topic}", cell, robots, max_cycles=8)
        expected = expected_windows(cell, robots, max_cycles=8)
        wait_stored(influx, db, len(expected), 120, [a, b])
        scored = [d.metric("cellwatch_windows_scored_total") for d in (a, b)]
        assert min(scored) > 0, f"one daemon did all the work: {scored}"
        assert sum(scored) >= len(expected)
        stable = [d.metric("cellwatch_kafka_rebalances_total") for d in (a, b)] == rebalances
        assert a.stop() == 0
        assert b.stop() == 0
    finally:
        a.kill()
        b.kill()
    assert_exactly_once(stored(influx, db), expected, reference_scores)
    files = [written(scores_file(cfg)), written(scores_file(other))]
    assert min(len(f) for f in files) > 0
    if stable:  # each partition read by one member: every window written once, by one of the two
        assert_written_once(files[0] + files[1], expected)
    else:  # a rebalance mid-stream: the new owner reads from the committed offset (at-least-once)
        assert_written_at_least_once(files, expected, "rebalance during the stream")


# -- bad input ------------------------------------------------------------------------------------------


def garbage(cell: Path, robot: str, limit: int) -> dict[str, bytes]:
    """One bad payload per rejection reason, each built from a real message of the recording."""
    import json

    from ingest.messages import encode_json
    from ingest.voraus import schema

    batch = next(plan(cell, [robot], start_ns=T0 - 10**12, rows_per_message=5))
    good = json.loads(encode_json(batch, schema.MACHINE_SIGNALS))
    wrong_type = {**good, "time_ns": "yesterday"}
    nan = {**good, "signals": {**good["signals"], "target_position_1": [float("nan")] * batch.rows}}
    missing = {**good, "signals": {"target_position_1": good["signals"]["target_position_1"]}}
    return {
        "bad_json": json.dumps(good).encode()[:-40],
        "wrong_type": json.dumps(wrong_type).encode(),
        "nan": json.dumps(nan).encode(),  # Python writes the NaN literal, which strict JSON readers refuse
        "missing_signals": json.dumps(missing).encode(),
        "unknown_format": b"\x00\x01\x02 not a message",
        "too_large": json.dumps({**good, "pad": "x" * (limit + 1)}).encode(),
    }


def test_garbage_is_rejected_counted_and_dead_lettered_while_good_traffic_flows(
    tansu: TansuServer,
    mosquitto: MosquittoServer,
    influx: InfluxServer,
    tiny_cell_and_model: tuple[Path, Path],
    reference_scores: dict[int, float],
    tmp_path: Path,
) -> None:
    """One daemon, two sources: garbage goes to both, interleaved with good traffic; each bad message is
    counted under its reason (and on Kafka copied to the dead-letter topic), every good window lands."""
    import aiomqtt
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    cell, model = tiny_cell_and_model
    topic, dead, prefix, db = unique("signals"), unique("dead"), unique("cell"), unique("garbage")
    tansu.create_topic(topic, 4)
    tansu.create_topic(dead, 1)
    limit = 2**20
    cfg = config(
        model,
        influx,
        db,
        tmp_path,
        kafka_source(tansu, topic, unique("g"), dead_letter_topic=dead, max_message_bytes=limit),
    )
    cfg["sources"].append(mqtt_source(mosquitto, prefix, unique("cw"), max_message_bytes=limit))
    kafka_robots, mqtt_robots = robot_ids(2, "k"), robot_ids(2, "m")
    bad = garbage(cell, "k1", limit)
    bad_mqtt = garbage(cell, "m1", limit)  # a message naming another robot than its topic is rejected too
    daemon = Daemon(tmp_path, "d", cfg).start()

    async def send_garbage() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, max_request_size=4 * limit)
        await producer.start()
        try:
            for payload in bad.values():
                await producer.send_and_wait(topic, payload, key=b"k1")
        finally:
            await producer.stop()
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            for payload in bad_mqtt.values():
                await client.publish(f"{prefix}/m1/signals", payload, qos=1)

    try:
        send(f"kafka://{tansu.bootstrap}/{topic}", cell, kafka_robots, max_cycles=4)
        asyncio.run(send_garbage())
        send(f"mqtt://127.0.0.1:{mosquitto.port}/{prefix}/+/signals", cell, mqtt_robots, max_cycles=4)
        send(f"kafka://{tansu.bootstrap}/{topic}", cell, kafka_robots, skip_cycles=4, max_cycles=4)
        expected = expected_windows(cell, kafka_robots, max_cycles=8) | expected_windows(
            cell, mqtt_robots, max_cycles=4
        )
        wait_stored(influx, db, len(expected), 90, [daemon])
        for source in (f"kafka:{topic}", f"mqtt:{prefix}/+/signals"):
            for reason in bad:
                wait_until(
                    lambda s=source, r=reason: (
                        daemon.metric("cellwatch_rejects_total", source=s, reason=r) == 1
                    ),
                    30,
                    f"{source} to count one {reason}",
                )
        assert daemon.metric("cellwatch_rejects_total") == 2 * len(bad)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert_exactly_once(stored(influx, db), expected, reference_scores)
    assert_written_once(written(scores_file(cfg)), expected)

    async def dead_letters() -> list[Any]:
        consumer = AIOKafkaConsumer(dead, bootstrap_servers=tansu.bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            records: list[Any] = []
            while len(records) < len(bad):
                batches = await consumer.getmany(timeout_ms=5000)
                if not batches:
                    break
                records += [r for rs in batches.values() for r in rs]
            return records
        finally:
            await consumer.stop()

    letters = asyncio.run(dead_letters())
    reasons = sorted(dict(r.headers)["cellwatch-reason"].decode() for r in letters)
    assert reasons == sorted(bad)
    assert all(r.key == b"k1" for r in letters)


def test_window_mode_model_over_mqtt_scores_the_windows_it_was_trained_on(
    mosquitto: MosquittoServer, tiny_cell_and_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """A window-mode model fed by a stream: every window of each cycle (cut from the cycle's first row, as
    in training) is scored once, with the score of that window computed directly from the file."""
    import json

    from daemon.cli import main
    from flows.artifact import load_model
    from flows.preprocess import downsample, window_starts
    from flows.scorer import Scorer
    from ingest.voraus.reader import VorausReader

    cell, _ = tiny_cell_and_model
    model_dir = tmp_path / "window-model"
    train = ["--rate-divider", "10", "--epochs", "2", "--mode", "window", "--window", "32", "--hop", "16"]
    assert main(["train", "--data", str(cell), "--out", str(model_dir), *train]) == 0
    model = load_model(model_dir)
    scorer = Scorer(model, device="cpu")
    divider, w, h = 10, 32, 16
    robots, cycles = ["w1"], 3
    # expected: (time of the window's last sample) -> score, for the first test cycles as sent
    expected: dict[int, float] = {}
    starts = [b.time_ns for b in plan(cell, robots, start_ns=T0, max_cycles=cycles) if b.cycle_row == 0]
    with VorausReader(cell, model.card.signals) as reader:
        test_cycles = [c for c in reader.cycles() if not c.is_train][:cycles]
    period = round(1e9 / (model.card.rate_hz * divider))
    for start_ns, cycle in zip(starts, test_cycles, strict=True):
        ds = np.asarray(downsample(cycle.signals, divider), dtype=np.float32)
        for s in window_starts(len(ds), w, h):
            x = scorer.prepare_cycle(ds[s : s + w])
            expected[start_ns + (s + w - 1) * divider * period] = float(scorer.score(x[None]).raw[0])

    prefix = unique("win")
    scores = tmp_path / "scores.jsonl"
    cfg = {
        "sources": [mqtt_source(mosquitto, prefix, unique("cw"))],
        "model": {"path": str(model_dir)},
        "sinks": {"file": {"path": str(scores)}},
        "state_dir": str(tmp_path),
    }
    daemon = Daemon(tmp_path, "d", cfg).start()

    def got() -> dict[int, float]:
        if not scores.exists():
            return {}
        lines = [json.loads(line) for line in scores.read_text().splitlines()]
        return {p["time_ns"]: p["score"] for p in lines if p["measurement"] == "anomaly_score"}

    try:
        send(f"mqtt://127.0.0.1:{mosquitto.port}/{prefix}/+/signals", cell, robots, max_cycles=cycles)
        # the last cycle's last window is out as soon as its rows are: all expected windows arrive
        wait_until(lambda: set(got()) >= set(expected), 60, f"{len(expected)} windows")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    stored = got()
    assert set(stored) == set(expected)
    lines = [json.loads(line) for line in scores.read_text().splitlines()]
    assert sum(p["measurement"] == "anomaly_score" for p in lines) == len(expected)  # each window once
    for t, score in expected.items():
        assert stored[t] == pytest.approx(score, rel=1e-3, abs=1e-3)
