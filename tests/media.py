"""Video for the camera tests: a short clip encoded with PyAV, and real servers that stream it on
private localhost ports.

- `encode_clip` writes distinct generated frames as H.264 (libx264, bundled in the PyAV wheel) in MP4:
  the codec IP cameras send, and one that both servers below relay packet for packet without
  re-encoding, so a frame decoded from a stream is bit-identical to the same frame decoded from the file.
- `RtspServer`: GStreamer's gst-rtsp-server (Debian `gir1.2-gst-rtsp-server-1.0`, run by the system
  Python, which has `python3-gi`; the venv does not see it) serving the file at rtsp://127.0.0.1:PORT/cam.
  Each client session plays the file from its start at its own pace, then ends.
- `HttpStreamServer`: `ffmpeg -re -i FILE -c copy -f mpegts -listen 1 http://127.0.0.1:PORT/cam`
  (Debian's ffmpeg): one client, the file at its own pace as MPEG-TS, then ffmpeg exits.

Both are ready once their port is in LISTEN state, read from /proc/net/tcp: connecting to find out
would take the ffmpeg server's one client. Missing tools fail loudly (.ci/setup installs them).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np
from services import ServerProcess, free_port

SYSTEM_PYTHON = "/usr/bin/python3"  # has python3-gi (Debian); the venv's python does not

_RTSP_SERVER = r"""
import sys

try:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer
except (ImportError, ValueError) as err:
    sys.exit(f"gst-rtsp-server is not usable from {sys.executable}: {err} "
             "(apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good "
             "gstreamer1.0-plugins-bad; .ci/setup does)")

port, path, mount = sys.argv[1], sys.argv[2], sys.argv[3]
Gst.init(None)
for element in ("filesrc", "qtdemux", "h264parse", "rtph264pay"):
    if Gst.ElementFactory.find(element) is None:
        sys.exit(f"GStreamer element {element} is missing (gstreamer1.0-plugins-good/-bad)")
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
# the file's H.264 packets as they are, paced by their timestamps; SPS/PPS repeated before key frames
factory.set_launch(
    f"( filesrc location={path} ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )"
)
server.get_mount_points().add_factory(mount, factory)
if server.attach(None) == 0:
    sys.exit(f"cannot listen on 127.0.0.1:{port}")
print(f"serving {path} at rtsp://127.0.0.1:{port}{mount}", flush=True)
GLib.MainLoop().run()
"""


def frame_image(i: int, width: int, height: int) -> np.ndarray:
    """Frame i of the clip: gradients, a checkerboard that moves and a colour that changes per frame
    (uint8 RGB), so every frame differs from the others."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = (xx * 255 // max(width - 1, 1) + 12 * i) % 256
    image[..., 1] = yy * 255 // max(height - 1, 1)
    image[..., 2] = (37 * i) % 256
    checker = ((yy // 16 + (xx + 4 * i) // 16) % 2).astype(bool)
    image[checker, 1] //= 2
    return image


def encode_clip(path: Path, *, frames: int = 20, width: int = 160, height: int = 120, fps: int = 20) -> Path:
    """An H.264 MP4 of `frames` distinct frames at `fps`: no B-frames (decode order is display order),
    a key frame every 5 frames (a receiver joining mid-way, or after a damaged frame, recovers soon)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(
            "libx264",
            rate=fps,
            options={"g": "5", "bf": "0", "preset": "ultrafast", "tune": "zerolatency"},
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame_image(i, width, height), format="rgb24")))
        out.mux(stream.encode(None))
    return path


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame of a file as uint8 RGB, decoded directly with PyAV; packets the decoder refuses are
    passed over (as the source does)."""
    images = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                continue
            images += [frame.to_ndarray(format="rgb24") for frame in frames]
    return images


def damage_packet(src: Path, dst: Path, index: int, seed: int = 1) -> Path:
    """A copy of `src` (remuxed, nothing re-encoded) whose packet `index` carries random bytes of the
    same length: the container stays valid, that one frame's data is garbage."""
    rng = np.random.default_rng(seed)
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        in_stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        k = 0
        for packet in inp.demux(in_stream):
            if packet.dts is None:  # the flush packet at the end
                continue
            if k == index:
                bad = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
                bad.pts, bad.dts, bad.time_base = packet.pts, packet.dts, packet.time_base
                bad.is_keyframe = packet.is_keyframe
                bad.stream = out_stream
                out.mux(bad)
            else:
                packet.stream = out_stream
                out.mux(packet)
            k += 1
    return dst


def listening(port: int) -> bool:
    """Whether a TCP socket listens on 127.0.0.1:port (or any address), without connecting to it."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(want) and fields[3] == "0A":  # local address, state LISTEN
                return True
    return False


class _PortServer(ServerProcess):
    """Ready once its port listens; `start()` after `stop()` serves on the same port again."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.port = free_port()

    def ready(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and listening(self.port)

    def start(self) -> None:
        try:
            super().start()
        except RuntimeError as err:
            log = (self.root / f"{self.name}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{err}\n{log}") from None

    def stop(self) -> None:
        super().stop()
        # stop() waits until ready() is false, which is at once here (no process): wait for the port
        from services import wait_until

        wait_until(lambda: not listening(self.port), 10, f"{self.name} to close port {self.port}")


class RtspServer(_PortServer):
    """gst-rtsp-server serving `clip` at `url` (rtsp://127.0.0.1:PORT/cam), each session from the
    file's start."""

    name = "rtsp-server"

    def __init__(self, root: Path, clip: Path) -> None:
        super().__init__(root)
        if not Path(SYSTEM_PYTHON).exists():
            raise RuntimeError(f"{SYSTEM_PYTHON} is missing: the RTSP server runs on the system Python")
        self.clip = clip
        self.script = root / "rtsp_server.py"
        self.script.write_text(_RTSP_SERVER)
        self.url = f"rtsp://127.0.0.1:{self.port}/cam"

    def command(self) -> list[str]:
        return [SYSTEM_PYTHON, str(self.script), str(self.port), str(self.clip), "/cam"]


class HttpStreamServer(_PortServer):
    """ffmpeg streaming `clip` as MPEG-TS over HTTP to one client at `url`, in real time (`-re`);
    `loop` repeats the file without end."""

    name = "ffmpeg-http"

    def __init__(self, root: Path, clip: Path, *, loop: bool = False) -> None:
        super().__init__(root)
        self.binary = shutil.which("ffmpeg")
        if self.binary is None:
            raise RuntimeError("ffmpeg is not installed (.ci/setup installs Debian's ffmpeg package)")
        self.clip, self.loop = clip, loop
        self.url = f"http://127.0.0.1:{self.port}/cam"

    def command(self) -> list[str]:
        assert self.binary is not None
        loop = ["-stream_loop", "-1"] if self.loop else []
        return [
            self.binary, "-nostdin", "-hide_banner", "-loglevel", "warning",
            "-re", *loop, "-i", str(self.clip),
            "-c", "copy", "-f", "mpegts", "-listen", "1", self.url,
        ]  # fmt: skip

    def exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None
