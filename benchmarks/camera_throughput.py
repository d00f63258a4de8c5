"""Camera frames per second one daemon sustains next to 16 robots of signals, the latency from a frame to
its `image_score` point in InfluxDB, and the daemon's memory and CPU (issue 11).

Everything runs on this machine: Mosquitto, InfluxDB 1.x, the load generators and one daemon
(`cellwatch run` as a subprocess, `models: [signal, ast]`, one MQTT signal source and one `mqtt_frames`
source) share its cores. Each step streams 16 robots of signals (100 Hz x 130 signals, Arrow, one
message of 100 rows per robot per second, timestamps = wall clock, phases spread over 10 s, as
stream_capacity.py does) for --seconds, and at the same time JPEG frames at the step's total rate,
dealt round-robin to --cameras cameras (`cell/{robot}/camera/cam1` of the first robots), QoS 1, with the
MQTT 5 user properties `time_ns` = the moment the frame is sent and `frame` = its number.

InfluxDB is polled every 50 ms (one request for both measurements). A frame's latency is (first seen in
InfluxDB - its `time_ns`): broker, JPEG decode, queue, AST scoring, sink and InfluxDB's write all
included, plus up to one poll interval. A signal window's latency is (first seen - the moment its
cycle's last message was sent), as in stream_capacity.py. A step is sustained when every frame sent
during it is stored within --deadline seconds with p99 under --p99-limit, and the signal side keeps up
too: every cycle stored within --deadline, p99 under --signal-p99-limit. The ramp stops at the first
step that is not sustained. Before the first step one signal cycle and a few frames are scored (warm-up).

Set-up (skipped for what is given): a generated brick image data set (--size px) and an AST trained on
it with the defaults but --ast-epochs epochs (scoring cost does not depend on how well it was trained);
a simulated 60-cycle cell and an MVT-Flow trained on it (10 Hz, 3 epochs, the tests' recipe). --work
keeps them for the next run.

Usage:  python benchmarks/camera_throughput.py [--fps 1,2,5,10,20] [--seconds 30] [--device cpu|cuda]
        [--model AST_DIR] [--signal-model MVTFLOW_DIR --data CELL.parquet] [--work DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from brokers import MosquittoServer
from daemons import CELLWATCH, Daemon
from services import InfluxServer

from ingest.loadgen import Target, plan, publish, robot_ids

console = Console()
RESULTS = Path(__file__).parent / "results"
FRAME_TOPIC = "cell/{robot}/camera/{camera}"
POLL_S = 0.05


# -- set-up ---------------------------------------------------------------------------------------------
def _train(args: list[str], log: Path) -> None:
    started = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run([str(CELLWATCH), "train", *args], stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"cellwatch train {' '.join(args)} failed ({rc}); see {log}")
    console.print(f"  trained in {time.perf_counter() - started:.0f} s: {' '.join(args)}")


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The two models, the signal recording and the JPEG frames (made here unless given)."""
    from ingest.sim.images import write_image_dataset

    setup: dict[str, Any] = {}
    device = ["--device", args.device]
    images = args.images or work / "brick"
    if args.images is None and not (images / "test").is_dir():
        console.print(f"image data set: brick, {args.size} px -> {images}")
        write_image_dataset(
            images, seed=11, n_train=24, n_test_good=12, n_per_defect=3, size=args.size, category="brick"
        )
    model = args.model or work / "ast"
    if args.model is None and not (model / "model.json").exists():
        console.print("training the AST (the defaults, few epochs) ...")
        _train(
            ["--data", str(images), "--out", str(model), "--epochs", str(args.ast_epochs), *device],
            work / "train-ast.log",
        )
    data = args.data or work / "cell.parquet"
    if args.data is None and not data.exists():
        from ingest.sim.dataset import write_recording
        from ingest.sim.scenarios import plan_recording

        console.print(f"simulated cell (60 cycles) -> {data}")
        write_recording(data, plan_recording(cycles=60, seed=8), seed=8)
    signal_model = args.signal_model or work / "mvtflow"
    if args.signal_model is None and not (signal_model / "model.json").exists():
        console.print("training the MVT-Flow (10 Hz, 3 epochs) ...")
        _train(
            [
                "--data",
                str(data),
                "--out",
                str(signal_model),
                "--rate-divider",
                "10",
                "--epochs",
                "3",
                *device,
            ],
            work / "train-mvtflow.log",
        )
    frames, shape = jpeg_frames(images, args.jpeg_quality)
    card = json.loads((model / "model.json").read_text())
    features, arch = card.get("features", {}), card.get("architecture", {})
    height, width = features.get("input_size", ["?", "?"])
    ast_card = (
        f"{features.get('backbone')} block {features.get('block')}, {height}x{width} px input, "
        f"teacher hidden {arch.get('teacher_hidden')}, student width {arch.get('student_width')}, "
        f"reduce {card.get('scoring', {}).get('reduce')}"
    )
    setup.update(
        images=str(images),
        ast_model=str(model),
        ast_card=ast_card,
        signal_data=str(data),
        signal_model=str(signal_model),
        frames=len(frames),
        frame_shape=list(shape),
        jpeg_bytes_mean=float(np.mean([len(f) for f in frames])),
        frames_list=frames,
    )
    return setup


def jpeg_frames(images: Path, quality: int) -> tuple[list[bytes], tuple[int, ...]]:
    """Every test image (good and defective, in name order) as JPEG bytes, encoded once."""
    from PIL import Image

    from ingest.images import read_image

    paths = sorted((images / "test").glob("*/*.png")) or sorted(images.glob("*.png"))
    if not paths:
        raise SystemExit(f"{images}: no PNG frames (expected test/*/*.png)")
    out = []
    shape: tuple[int, ...] = ()
    for path in paths:
        pixels = read_image(path)
        shape = pixels.shape
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out, shape


# -- measuring ------------------------------------------------------------------------------------------
class Poller(threading.Thread):
    """Every POLL_S: the points of both measurements since `since_ns`, first-seen wall time per key."""

    def __init__(self, influx: InfluxServer, db: str, since_ns: int) -> None:
        super().__init__(daemon=True)
        self.influx, self.db, self.since_ns = influx, db, since_ns
        self.windows: dict[tuple[str, int], int] = {}
        self.frames: dict[tuple[str, str, int], int] = {}
        self.stop = threading.Event()
        self.errors = 0

    def run(self) -> None:
        q = (
            f'SELECT "cycle", "robot" FROM "anomaly_score" WHERE time >= {self.since_ns}; '
            f'SELECT "seq", "robot", "camera" FROM "image_score" WHERE time >= {self.since_ns}'
        )
        while not self.stop.is_set():
            try:
                results = self.influx.query(q, self.db)["results"]
            except OSError:
                self.errors += 1
                results = []
            now = time.time_ns()
            for i, result in enumerate(results):
                for series in result.get("series", []):
                    columns = series["columns"]
                    for row in series["values"]:
                        value = dict(zip(columns, row, strict=True))
                        if i == 0:
                            self.windows.setdefault((value["robot"], int(value["time"])), now)
                        else:
                            key = (value["robot"], value["camera"], int(value["time"]))
                            self.frames.setdefault(key, now)
            time.sleep(POLL_S)


class Sampler(threading.Thread):
    """The daemon's peak RSS (with any children) every 0.25 s; with `gpu`, its peak GPU memory and the
    GPU's mean utilization from nvidia-smi every second."""

    def __init__(self, pid: int, gpu: bool) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.gpu = gpu and shutil.which("nvidia-smi") is not None
        self.rss = 0
        self.gpu_mib = 0.0
        self.gpu_util: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        last_gpu = 0.0
        while not self.stop.is_set():
            with contextlib.suppress(psutil.Error):
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.rss = max(self.rss, sum(p.memory_info().rss for p in procs))
            if self.gpu and time.monotonic() - last_gpu >= 1.0:
                last_gpu = time.monotonic()
                self._sample_gpu()
            time.sleep(0.25)

    def _sample_gpu(self) -> None:
        def smi(*query: str) -> list[str]:
            out = subprocess.run(
                ["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True
            )
            return out.stdout.strip().splitlines() if out.returncode == 0 else []

        for line in smi("--query-compute-apps=pid,used_memory"):
            pid, _, mib = line.partition(",")
            if pid.strip() == str(self.proc.pid):
                self.gpu_mib = max(self.gpu_mib, float(mib))
        for line in smi("--query-gpu=utilization.gpu")[:1]:
            self.gpu_util.append(float(line))


async def publish_frames(
    port: int,
    cameras: list[tuple[str, str]],
    frames: list[bytes],
    fps: float,
    seconds: float,
    sent: dict[tuple[str, str, int], int],
    lag: list[float],
    first: int = 0,
) -> float:
    """`fps` x `seconds` frames, paced on the wall clock; each one's key (robot, camera, time_ns) goes into
    `sent` as it leaves; returns the rate they left at (QoS 1 PUBACKs are awaited in the background)."""
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=f"bench-camera-{time.time_ns()}",
        protocol=aiomqtt.ProtocolVersion.V5,
        max_inflight_messages=1000,
        max_queued_outgoing_messages=0,
    )
    client.pending_calls_threshold = 100_000
    pending: set[asyncio.Future[Any]] = set()
    count = round(fps * seconds)
    async with client:
        started = time.time()
        for i in range(count):
            due = started + i / fps
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            robot, camera = cameras[i % len(cameras)]
            now_ns = time.time_ns()
            lag.append(now_ns / 1e6 - due * 1e3)
            properties = Properties(PacketTypes.PUBLISH)
            properties.UserProperty = [("time_ns", str(now_ns)), ("frame", str(first + i))]
            topic = FRAME_TOPIC.format(robot=robot, camera=camera)
            payload = frames[(first + i) % len(frames)]
            task = asyncio.ensure_future(client.publish(topic, payload, qos=1, properties=properties))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent[(robot, camera, now_ns)] = now_ns
        if pending:
            await asyncio.wait(set(pending))
    times = sorted(sent.values())[-count:]
    return (count - 1) / ((times[-1] - times[0]) / 1e9) if count > 1 else float("nan")


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _wait(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def warm_up(
    args: argparse.Namespace, mqtt_port: int, data: Path, frames: list[bytes], daemon: Daemon
) -> None:
    """One signal cycle (sent at once, timestamps in the past) and 2 x frame_batch frames, scored before
    the clock starts: the first scoring calls pay for allocations a running daemon has behind it."""
    url = f"mqtt://127.0.0.1:{mqtt_port}/cell/+/signals"
    batches = plan(data, ["warmup"], start_ns=time.time_ns() - 60 * 10**9, max_cycles=1)
    frame_count = 2 * args.frame_batch

    async def both() -> None:
        sent: dict[tuple[str, str, int], int] = {}
        await asyncio.gather(
            publish(Target.parse(url), batches, fmt="arrow", speed=float("inf")),
            publish_frames(mqtt_port, [("warmup", "cam1")], frames, 50.0, frame_count / 50.0, sent, []),
        )

    asyncio.run(both())
    ok = _wait(
        lambda: (
            daemon.metric("cellwatch_windows_scored_total") >= 1
            and daemon.metric("cellwatch_frames_scored_total") >= frame_count
        ),
        120,
    )
    if not ok:
        raise SystemExit(f"warm-up: the daemon scored nothing in 120 s\n{daemon.log_tail()}")


def step(
    args: argparse.Namespace,
    fps: float,
    index: int,
    mqtt_port: int,
    data: Path,
    frames: list[bytes],
    influx: InfluxServer,
    db: str,
    daemon: Daemon,
) -> dict[str, Any]:
    robots = robot_ids(args.robots, f"s{index}r")
    cameras = [(robots[j % len(robots)], "cam1") for j in range(args.cameras)]
    start_ns = time.time_ns()
    cycles_per_robot = max(1, int(args.seconds / 11) + 1)
    options: dict[str, Any] = {"rows_per_message": 100, "max_cycles": cycles_per_robot, "spread_s": 10.0}
    end_ns = start_ns + int(args.seconds * 1e9)
    limited = (b for b in plan(data, robots, start_ns=start_ns, **options) if b.end_ns <= end_ns)
    expected = {
        (b.robot, b.end_ns)
        for b in plan(data, robots, start_ns=start_ns, **options)
        if b.cycle_end and b.end_ns <= end_ns
    }
    window_sent: dict[tuple[str, int], int] = {}

    def on_message(batch: Any) -> None:
        if batch.cycle_end:
            window_sent[(batch.robot, batch.end_ns)] = time.time_ns()

    frame_sent: dict[tuple[str, str, int], int] = {}
    frame_lag: list[float] = []
    poller = Poller(influx, db, start_ns)
    poller.start()
    assert daemon.proc is not None
    sampler = Sampler(daemon.proc.pid, args.device == "cuda")
    sampler.start()
    before = daemon.metrics() or {}
    cpu_before = sampler.proc.cpu_times()
    load_before = os.getloadavg()[0]
    url = f"mqtt://127.0.0.1:{mqtt_port}/cell/+/signals"

    async def both() -> tuple[Any, float]:
        stats, fps_sent = await asyncio.gather(
            publish(Target.parse(url), limited, fmt="arrow", live=True, on_message=on_message),
            publish_frames(mqtt_port, cameras, frames, fps, args.seconds, frame_sent, frame_lag),
        )
        return stats, fps_sent

    t0 = time.perf_counter()
    stats, fps_sent = asyncio.run(both())
    publish_wall = time.perf_counter() - t0
    cpu_after = sampler.proc.cpu_times()  # CPU while the load ran (not the drain)
    _wait(lambda: expected <= set(poller.windows) and set(frame_sent) <= set(poller.frames), args.deadline)
    poller.stop.set()
    sampler.stop.set()
    poller.join()
    sampler.join()
    after = daemon.metrics() or {}

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    frame_lat = np.array([(poller.frames[k] - t) / 1e6 for k, t in frame_sent.items() if k in poller.frames])
    window_lat = np.array(
        [
            (poller.windows[k] - window_sent[k]) / 1e6
            for k in expected
            if k in poller.windows and k in window_sent
        ]
    )
    scored = delta("cellwatch_frames_scored_total")
    cpu = (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system) / publish_wall * 100
    row: dict[str, Any] = {
        "fps": fps,
        "fps_sent": fps_sent,
        "cameras": args.cameras,
        "robots": args.robots,
        "frames": len(frame_sent),
        "frames_stored": int(sum(k in poller.frames for k in frame_sent)),
        "frame_p50": _pct(frame_lat, 50),
        "frame_p99": _pct(frame_lat, 99),
        "frame_max": float(frame_lat.max()) if len(frame_lat) else float("nan"),
        "windows": len(expected),
        "windows_stored": int(sum(k in poller.windows for k in expected)),
        "signal_p50": _pct(window_lat, 50),
        "signal_p99": _pct(window_lat, 99),
        "signal_max": float(window_lat.max()) if len(window_lat) else float("nan"),
        "signal_messages_per_s": stats.messages / publish_wall,
        "cpu_percent": cpu,
        "rss_mib": sampler.rss / 2**20,
        "frame_inference_ms": delta("cellwatch_frame_inference_seconds_total") / scored * 1e3
        if scored
        else float("nan"),
        "frames_per_batch": scored / delta("cellwatch_frame_batches_total")
        if delta("cellwatch_frame_batches_total")
        else float("nan"),
        "anomalous_frames": int(delta("cellwatch_anomalous_frames_total")),
        "overlays_saved": int(delta("cellwatch_overlays_saved_total")),
        "signal_inference_s": delta("cellwatch_inference_seconds_total"),
        "frame_publisher_lag_p99_ms": _pct(np.array(frame_lag), 99),
        "load_average_1min_before": load_before,
        "poll_errors": poller.errors,
    }
    if args.device == "cuda":
        row["gpu_mib"] = sampler.gpu_mib
        row["gpu_util_mean"] = float(np.mean(sampler.gpu_util)) if sampler.gpu_util else float("nan")
    frames_ok = (
        row["frames_stored"] == row["frames"]
        and row["frame_max"] <= args.deadline * 1e3
        and row["frame_p99"] <= args.p99_limit
    )
    signals_ok = (
        row["windows_stored"] == row["windows"]
        and row["signal_max"] <= args.deadline * 1e3
        and row["signal_p99"] <= args.signal_p99_limit
    )
    row.update(frames_kept_up=bool(frames_ok), signals_kept_up=bool(signals_ok))
    row["sustained"] = bool(frames_ok and signals_ok)
    return row


# -- report ---------------------------------------------------------------------------------------------
COLUMNS = [
    ("fps", "fps", "{:g}"),
    ("sent fps", "fps_sent", "{:.1f}"),
    ("frames stored", None, ""),
    ("frame p50 ms", "frame_p50", "{:.0f}"),
    ("frame p99 ms", "frame_p99", "{:.0f}"),
    ("frame max ms", "frame_max", "{:.0f}"),
    ("ms/frame scoring", "frame_inference_ms", "{:.0f}"),
    ("frames/batch", "frames_per_batch", "{:.1f}"),
    ("cycles stored", None, ""),
    ("signal p50 ms", "signal_p50", "{:.0f}"),
    ("signal p99 ms", "signal_p99", "{:.0f}"),
    ("daemon CPU %", "cpu_percent", "{:.0f}"),
    ("daemon RSS MiB (peak)", "rss_mib", "{:.0f}"),
    ("sustained", None, ""),
]


def cells(r: dict[str, Any]) -> list[str]:
    out = []
    for title, key, fmt in COLUMNS:
        if title == "frames stored":
            out.append(f"{r['frames_stored']}/{r['frames']}")
        elif title == "cycles stored":
            out.append(f"{r['windows_stored']}/{r['windows']}")
        elif title == "sustained":
            why = [
                w for w, ok in (("frames", r["frames_kept_up"]), ("signals", r["signals_kept_up"])) if not ok
            ]
            out.append("yes" if r["sustained"] else "no (" + ", ".join(why) + ")")
        else:
            assert key is not None
            out.append(fmt.format(r[key]))
    return out


def write_report(args: argparse.Namespace, result: dict[str, Any], md: Path, js: Path) -> None:
    md.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(result, indent=2) + "\n")
    rows = result["steps"]
    sustained = [r["fps"] for r in rows if r["sustained"]]
    loads = ", ".join(f"{r['load_average_1min_before']:.1f}" for r in rows)
    lines = [
        "# Camera throughput: frames per second one daemon sustains next to 16 robots of signals",
        "",
        f"Measured {result['when']} by `{result['command']}` on {result['machine']}.",
        "",
        f"One daemon (`models: [signal, ast]`, scoring.device {args.device}, frame_batch {args.frame_batch}, "
        f"max_wait_ms {args.max_wait_ms}, frame_max_wait_ms {args.frame_max_wait_ms}) with {args.robots} "
        "robots of signals "
        "(100 Hz x 130, MQTT, real time) "
        f"and JPEG frames over MQTT (`mqtt_frames`, {result['setup']['frame_shape'][1]}x"
        f"{result['setup']['frame_shape'][0]} px, {result['setup']['jpeg_bytes_mean'] / 1024:.0f} KiB, "
        f"{args.cameras} cameras, the step's rate in total), InfluxDB sink; Mosquitto, InfluxDB, the "
        "generators and the daemon share the machine. AST: the defaults "
        f"({result['setup']['ast_card']}) trained {args.ast_epochs} epochs. "
        "Frame latency = first seen in InfluxDB (polled every 50 ms) - the frame's time_ns (its send "
        "time); signal latency = first seen - the "
        "send time of the cycle's last message. "
        f"Sustained: every frame and cycle stored within {args.deadline:g} s, frame p99 < "
        f"{args.p99_limit:g} ms, signal p99 < {args.signal_p99_limit:g} ms. {args.seconds:g} s per step.",
        "",
        "| " + " | ".join(t for t, _, _ in COLUMNS) + " |",
        "|" + "|".join("---:" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    lines += [
        "",
        f"**Sustained: {max(sustained):g} fps**" if sustained else "**No step sustained.**",
        f"(daemon RSS idle with both models loaded: {result['rss_idle_mib']:.0f} MiB; "
        f"1-min load average before each step: {loads}; "
        "other jobs shared the 2 cores, so these figures are a floor, not a ceiling).",
        "",
        "Per step in the JSON: publisher lag, anomalous frames and overlays saved, signal inference seconds"
        + (", GPU memory and utilization." if args.device == "cuda" else "."),
        "",
    ]
    md.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fps", default="1,2,5,10,20", help="total frame rates of the steps")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of a step")
    ap.add_argument("--robots", type=int, default=16)
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--deadline", type=float, default=10.0, help="s: a frame or cycle stored later fails")
    ap.add_argument("--p99-limit", type=float, default=1000.0, help="ms, frames")
    ap.add_argument("--signal-p99-limit", type=float, default=2000.0, help="ms, signal windows")
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="scoring.device")
    ap.add_argument("--frame-batch", type=int, default=8, help="scoring.frame_batch")
    ap.add_argument("--max-wait-ms", type=int, default=20, help="scoring.max_wait_ms")
    ap.add_argument(
        "--frame-max-wait-ms",
        type=int,
        default=None,
        help="scoring.frame_max_wait_ms (default: --max-wait-ms)",
    )
    ap.add_argument("--model", type=Path, help="an AST model (default: trained here)")
    ap.add_argument("--images", type=Path, help="frames: an MVTec-layout folder (its test split) or PNGs")
    ap.add_argument("--size", type=int, default=256, help="generated images' size in px")
    ap.add_argument("--ast-epochs", type=int, default=2)
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--signal-model", type=Path, help="an MVT-Flow model (default: trained here)")
    ap.add_argument("--data", type=Path, help="the voraus-AD parquet the robots stream (default: simulated)")
    ap.add_argument("--work", type=Path, help="keep data and models here (reused by the next run)")
    ap.add_argument("--out", type=Path, default=RESULTS / "camera_throughput", help="writes OUT.md, OUT.json")
    args = ap.parse_args()
    if args.data is not None and args.signal_model is None:
        ap.error("--data needs --signal-model (a model trained on that file's signals)")

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    rss_idle = float("nan")
    with tempfile.TemporaryDirectory(prefix="cellwatch-camera-bench-") as tmp:
        root = Path(tmp)
        work = args.work or root / "work"
        work.mkdir(parents=True, exist_ok=True)
        setup = prepare(args, work)
        frames: list[bytes] = setup.pop("frames_list")
        setup_s = time.perf_counter() - started
        influx = InfluxServer(root / "influx")
        mqtt = MosquittoServer(root / "mq")
        influx.start()
        mqtt.start()
        db = "bench_camera"
        influx.create_database(db)
        config = {
            "sources": [
                {
                    "type": "mqtt",
                    "host": "127.0.0.1",
                    "port": mqtt.port,
                    "topic": "cell/+/signals",
                    "client_id": "bench-signals",
                    "receive_maximum": 65535,
                },
                {
                    "type": "mqtt_frames",
                    "host": "127.0.0.1",
                    "port": mqtt.port,
                    "topic": FRAME_TOPIC,
                    "client_id": "bench-camera",
                },
            ],
            "models": [
                {"path": str(Path(setup["signal_model"]).resolve())},
                {"path": str(Path(setup["ast_model"]).resolve())},
            ],
            "scoring": {
                "batch": 32,
                "frame_batch": args.frame_batch,
                "max_wait_ms": args.max_wait_ms,
                "frame_max_wait_ms": args.frame_max_wait_ms,
                "device": args.device,
            },
            "sinks": {
                "influxdb": {
                    "url": influx.url,
                    "database": db,
                    "spool_dir": str(root / "spool"),
                    "flush_interval_ms": 50,
                }
            },
            "state_dir": str(root),
        }
        daemon = Daemon(root, "daemon", config)
        try:
            daemon.start(ready_timeout=120)
            assert daemon.proc is not None
            warm_up(args, mqtt.port, Path(setup["signal_data"]), frames, daemon)
            rss_idle = psutil.Process(daemon.proc.pid).memory_info().rss / 2**20
            for i, fps in enumerate(float(x) for x in args.fps.split(",")):
                console.print(f"step {i + 1}: {fps:g} fps + {args.robots} robots for {args.seconds:g} s ...")
                row = step(args, fps, i, mqtt.port, Path(setup["signal_data"]), frames, influx, db, daemon)
                rows.append(row)
                console.print(row)
                if not daemon.alive:
                    raise SystemExit(f"the daemon died:\n{daemon.log_tail()}")
                if not row["sustained"]:
                    break
        finally:
            with contextlib.suppress(Exception):
                daemon.stop()
            daemon.kill()
            mqtt.stop()
            influx.stop()

    table = Table(title=f"JPEG frames + {args.robots} robots -> one daemon ({args.device}) -> InfluxDB")
    for title, _, _ in COLUMNS:
        table.add_column(title, justify="right")
    for r in rows:
        table.add_row(*cells(r))
    console.print(table)
    command = "python benchmarks/camera_throughput.py " + " ".join(sys.argv[1:])
    result = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command.strip(),
        "machine": f"{psutil.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "setup": setup,
        "setup_seconds": setup_s,
        "total_seconds": time.perf_counter() - started,
        "rss_idle_mib": rss_idle,
        "sustained_fps": max((r["fps"] for r in rows if r["sustained"]), default=0.0),
        "steps": rows,
    }
    out: Path = args.out
    write_report(args, result, out.with_suffix(".md"), out.with_suffix(".json"))
    console.print(f"wrote {out.with_suffix('.md')} and .json in {result['total_seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
