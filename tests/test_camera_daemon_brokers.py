"""Camera frames over MQTT and Kafka through the real daemon (`cellwatch run` as a subprocess): a camera
publishing JPEG or PNG frames gets each frame scored once, with the robot, camera, time, cycle and frame
number it sent and the score `ImageScorer` gives the same payload offline; a corrupt payload is counted
by reason in the daemon's metrics and the frames after it are still scored; a daemon killed with
SIGKILL while frames are in flight loses none of them once restarted, and a frame it writes twice is
written with the same time and score (InfluxDB keeps it once).

The frames are the tiny data set's test images, sent as their PNG files and re-encoded as JPEG.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from brokers import MosquittoServer, TansuServer
from daemons import Daemon
from PIL import Image
from services import wait_until

from flows.ast.artifact import load_ast
from flows.ast.scorer import ImageScorer
from ingest.images import decode_image

pytestmark = pytest.mark.slow
T0 = 1_714_543_200_000_000_000
MS = 1_000_000


def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Sent:
    """One frame as the camera sends it: `time_ns` None leaves the time to the transport (Kafka: the
    record's timestamp, `timestamp_ms`)."""

    robot: str
    camera: str
    frame: int
    payload: bytes
    cycle: int | None
    time_ns: int | None
    timestamp_ms: int | None = None

    def metadata(self) -> dict[str, str]:
        """The user properties (MQTT) or headers (Kafka) of the frame."""
        out = {"frame": str(self.frame)}
        if self.time_ns is not None:
            out["time_ns"] = str(self.time_ns)
        if self.cycle is not None:
            out["cycle"] = str(self.cycle)
        return out

    @property
    def written_time(self) -> int:
        if self.time_ns is not None:
            return self.time_ns
        assert self.timestamp_ms is not None
        return self.timestamp_ms * MS


def jpeg(png: bytes, quality: int = 90) -> bytes:
    with Image.open(io.BytesIO(png)) as im:
        out = io.BytesIO()
        im.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def pictures_of(data: Path) -> list[bytes]:
    """The PNG files of the data set's test split."""
    return [p.read_bytes() for p in sorted((data / "test").glob("*/*.png"))]


def camera_frames(data: Path) -> list[Sent]:
    """Every test picture twice: as its PNG from robot A's top camera (with cycles), as a JPEG from robot
    B's side camera (without); frame numbers 1, 2, ... in the order sent."""
    pictures = pictures_of(data)
    a, b = unique("arm"), unique("arm")
    out = []
    for i, png in enumerate(pictures):
        out.append(Sent(a, "top", 2 * i + 1, png, 100 + i, T0 + (2 * i + 1) * MS))
        out.append(Sent(b, "side", 2 * i + 2, jpeg(png), None, T0 + (2 * i + 2) * MS))
    return out


def reference_scores(model: Path, frames: list[Sent]) -> dict[bytes, float]:
    """What the model scores each payload offline, one frame at a time."""
    scorer = ImageScorer(load_ast(model), device="cpu")
    return {f.payload: float(scorer.score(decode_image(f.payload)[None]).raw[0]) for f in frames}


def image_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if r["measurement"] == "image_score"]


def daemon_config(root: Path, model: Path, source: dict[str, Any], **scoring: Any) -> dict[str, Any]:
    return {
        "sources": [source],
        "model": {"path": str(model)},
        "scoring": {"max_wait_ms": 5, "device": "cpu", **scoring},
        "sinks": {"file": {"path": str(root / "scores.jsonl")}},
        "overlays": {"dir": str(root / "overlays")},
        "state_dir": str(root),
    }


def assert_scored_as_sent(
    rows: list[dict[str, Any]], frames: list[Sent], ref: dict[int, str], expected: dict[bytes, float]
) -> None:
    """Each frame exactly once, with what was sent and the offline score of its payload."""
    assert sorted(r["seq"] for r in rows) == sorted(f.frame for f in frames)
    by_seq = {r["seq"]: r for r in rows}
    for f in frames:
        r = by_seq[f.frame]
        assert (r["robot"], r["camera"], r["frame"]) == (f.robot, f.camera, ref[f.frame])
        assert r["cycle"] == (f.cycle if f.cycle is not None else -1)
        assert r["time_ns"] == f.written_time
        assert np.isclose(r["score"], expected[f.payload], rtol=1e-4), (f.frame, r["score"])


_SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*)\})? (\S+)$', re.M
)
_LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def metric(daemon: Daemon, name: str, **labels: str) -> float | None:
    """Sum of the samples of `name` whose labels include `labels`; None when there are none.

    Not `Daemon.metric`: its pattern drops every sample with a `}` in a label value, and an MQTT frame
    source is named after its topic template (source="mqtt_frames:cell/{robot}/camera/{camera}")."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    values = []
    for base, body, value in _SAMPLE.findall(text):
        got = {k: re.sub(r"\\.", lambda m: _UNESCAPE[m[0]], v) for k, v in _LABEL.findall(body)}
        if base == name and all(got.get(k) == v for k, v in labels.items()):
            values.append(float(value))
    return sum(values) if values else None


def scored(daemon: Daemon) -> float:
    return metric(daemon, "cellwatch_frames_scored_total") or 0.0


def wait_scored(daemon: Daemon, n: int, what: str) -> None:
    try:
        wait_until(lambda: scored(daemon) >= n, 60, what)
    except TimeoutError as err:
        raise AssertionError(f"{err}: {daemon.metrics()}\n{daemon.log_tail()}") from None


# ---------------------------------------------------------------------------------------------- MQTT


async def mqtt_publish(port: int, messages: list[tuple[str, bytes, dict[str, str]]]) -> None:
    """(topic, payload, user properties) at QoS 1, in order, each PUBACKed by the broker."""
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        for topic, payload, user in messages:
            properties = Properties(PacketTypes.PUBLISH)
            if user:
                properties.UserProperty = list(user.items())
            await client.publish(topic, payload, qos=1, properties=properties)


def test_mqtt_frames_are_scored_once_as_the_model_scores_their_payloads(
    mosquitto: MosquittoServer, tiny_images_and_ast: tuple[Path, Path], tmp_path: Path
) -> None:
    """A camera publishing PNG and JPEG frames on cell/<robot>/camera/<camera> with time_ns, cycle and
    frame user properties gets each frame scored once, as the model scores that payload offline, with
    the robot, camera, time, cycle and frame number it sent; a corrupt and a truncated payload among
    them are counted by reason in the daemon's metrics and the frames after them are still scored."""
    data, model = tiny_images_and_ast
    frames = camera_frames(data)
    expected = reference_scores(model, frames)

    def topic(f: Sent) -> str:
        return f"cell/{f.robot}/camera/{f.camera}"

    messages = [(topic(f), f.payload, f.metadata()) for f in frames]
    garbage = (topic(frames[0]), b"this is not an image", {"frame": "900"})
    truncated = (topic(frames[1]), frames[0].payload[: len(frames[0].payload) // 2], {"frame": "901"})
    messages[3:3] = [garbage]
    messages[9:9] = [truncated]
    source = {
        "type": "mqtt_frames",  # the default topic template: cell/{robot}/camera/{camera}
        "host": "127.0.0.1",
        "port": mosquitto.port,
        "client_id": unique("cw"),
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
    }
    name = "mqtt_frames:cell/{robot}/camera/{camera}"
    daemon = Daemon(tmp_path, "mqtt", daemon_config(tmp_path, model, source)).start()
    try:  # the daemon's session is subscribed once its metrics answer
        asyncio.run(mqtt_publish(mosquitto.port, messages))
        wait_scored(daemon, len(frames), "every MQTT frame scored")
        wait_until(
            lambda: metric(daemon, "cellwatch_source_unacked", source=name) == 0,
            30,
            "every frame acknowledged",
        )
        rejected = {
            reason: metric(daemon, "cellwatch_rejects_total", source=name, reason=reason)
            for reason in ("not_an_image", "unreadable")
        }
        assert rejected == {"not_an_image": 1, "unreadable": 1}
        assert scored(daemon) == len(frames)
    finally:
        assert daemon.stop() == 0
    rows = image_rows(tmp_path / "scores.jsonl")
    refs = {f.frame: f"{topic(f)}#{f.frame}" for f in frames}
    assert_scored_as_sent(rows, frames, refs, expected)
    assert {r["model"] for r in rows} == {model.name}


# --------------------------------------------------------------------------------------------- Kafka


async def produce(bootstrap: str, topic: str, frames: list[Sent | tuple[bytes, bytes]]) -> None:
    """Frames (or raw (key, value) records) to partition 0 in order, each acknowledged before the next."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for f in frames:
            if isinstance(f, Sent):
                key, value = f"{f.robot}/{f.camera}".encode(), f.payload
                headers = [(k, v.encode()) for k, v in f.metadata().items()]
                stamp = f.timestamp_ms
            else:
                (key, value), headers, stamp = f, [], None
            await producer.send_and_wait(
                topic, value, key=key, partition=0, headers=headers or None, timestamp_ms=stamp
            )
    finally:
        await producer.stop()


def kafka_source(tansu: TansuServer, topic: str, group: str, **kw: Any) -> dict[str, Any]:
    return {
        "type": "kafka_frames",
        "bootstrap": [tansu.bootstrap],
        "topic": topic,
        "group": group,
        "session_timeout_ms": 3000,
        **kw,
    }


def test_kafka_frames_are_scored_once_as_the_model_scores_their_payloads(
    tansu: TansuServer, tiny_images_and_ast: tuple[Path, Path], tmp_path: Path
) -> None:
    """A camera producing PNG and JPEG frames keyed robot/camera with time_ns, cycle and frame headers
    gets each frame scored once, as the model scores that payload offline, with the robot, camera, time,
    cycle and frame number it sent; a corrupt and a truncated record among them are counted by reason in
    the daemon's metrics and the frames after them are still scored."""
    data, model = tiny_images_and_ast
    frames = camera_frames(data)
    expected = reference_scores(model, frames)
    topic, group = unique("frames"), unique("g")
    tansu.create_topic(topic, 1)
    key = f"{frames[0].robot}/{frames[0].camera}".encode()
    records: list[Sent | tuple[bytes, bytes]] = list(frames)
    records[3:3] = [(key, b"this is not an image")]
    records[9:9] = [(key, frames[0].payload[: len(frames[0].payload) // 2])]
    asyncio.run(produce(tansu.bootstrap, topic, records))

    name = f"kafka_frames:{topic}"
    daemon = Daemon(tmp_path, "kafka", daemon_config(tmp_path, model, kafka_source(tansu, topic, group)))
    daemon.start()
    try:
        wait_scored(daemon, len(frames), "every Kafka frame scored")
        rejected = {
            reason: metric(daemon, "cellwatch_rejects_total", source=name, reason=reason)
            for reason in ("not_an_image", "unreadable")
        }
        assert rejected == {"not_an_image": 1, "unreadable": 1}
        assert scored(daemon) == len(frames)
    finally:
        assert daemon.stop() == 0
    rows = image_rows(tmp_path / "scores.jsonl")
    assert_scored_as_sent(rows, frames, {f.frame: f"{topic}#{f.frame}" for f in frames}, expected)


def test_kafka_frames_in_flight_at_a_sigkill_are_scored_after_the_restart(
    tansu: TansuServer, tiny_images_and_ast: tuple[Path, Path], tmp_path: Path
) -> None:
    """The daemon is killed (SIGKILL: no drain, no commit) while frames are being scored and started
    again with the same config: every frame the camera sent is in the scores, those scored but not yet
    committed before the crash are scored again with the same time, tags and score (InfluxDB keeps such
    a point once), and no frame is written twice by one process."""
    data, model = tiny_images_and_ast
    pictures = pictures_of(data)
    robot = unique("arm")
    frames: list[Sent] = []
    for quality in (None, 95, 80, 60):  # distinct payloads: PNG, then JPEG at three qualities
        for png in pictures:
            n = len(frames) + 1
            payload = png if quality is None else jpeg(png, quality)
            if n % 2:  # the time from the record's timestamp, not a header
                frames.append(Sent(robot, "top", n, payload, n, None, T0 // MS + 10 * n))
            else:
                frames.append(Sent(robot, "top", n, payload, n, T0 + n * MS))
    expected = reference_scores(model, frames)
    topic, group = unique("crash"), unique("g")
    tansu.create_topic(topic, 1)
    asyncio.run(produce(tansu.bootstrap, topic, list(frames)))

    # one frame a batch, at most a few fetched ahead: the crash lands among frames in flight
    source = kafka_source(tansu, topic, group, queue_messages=4)
    daemon = Daemon(tmp_path, "crash", daemon_config(tmp_path, model, source, frame_batch=1, max_wait_ms=0))
    out = tmp_path / "scores.jsonl"
    try:
        daemon.start()
        wait_scored(daemon, 4, "the first frames scored")
        daemon.kill()
        text = out.read_text()
        assert text.endswith("\n"), "the crash left an unfinished line"
        before = image_rows(out)
        assert 0 < len(before) < len(frames), "the crash came too late to test anything"
        daemon.start()

        def all_written() -> bool:
            return {r["seq"] for r in image_rows(out)} >= {f.frame for f in frames}

        try:
            wait_until(all_written, 60, "every frame written after the restart")
        except TimeoutError as err:
            raise AssertionError(f"{err}: {daemon.metrics()}\n{daemon.log_tail()}") from None
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    rows = image_rows(out)
    after = rows[len(before) :]
    for process in (before, after):  # at most once within each process
        counts = Counter(r["seq"] for r in process)
        assert not [n for n, c in counts.items() if c > 1], counts
    assert {r["seq"] for r in rows} == {f.frame for f in frames}
    ref = {f.frame: f"{topic}#{f.frame}" for f in frames}
    by_seq: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_seq.setdefault(r["seq"], []).append(r)
    for f in frames:
        first, *again = by_seq[f.frame]
        assert_scored_as_sent([first], [f], ref, expected)
        for r in again:  # the same point again: same measurement, tags and time
            assert (r["robot"], r["camera"], r["model"], r["time_ns"]) == (
                first["robot"],
                first["camera"],
                first["model"],
                first["time_ns"],
            )
            assert np.isclose(r["score"], first["score"], rtol=1e-4)
    twice = sorted(n for n, rs in by_seq.items() if len(rs) > 1)
    print(f"SIGKILL over Kafka: {len(before)} frames written before the crash, {len(twice)} again: {twice}")
