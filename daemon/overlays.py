"""Anomaly-map overlays of camera frames as PNG files, in a bounded directory the metrics endpoint serves.

`OverlayStore.save` draws a frame's anomaly map over the frame (the map upsampled to the frame's own
aspect ratio, at most `MAX_SIDE` pixels on the long side) with a legend line under it, and writes it as
`ROBOT_CAMERA_TIMENS_SEQ.png` and as `latest/ROBOT_CAMERA.png`, each atomically (a temporary file, then
`os.replace`), so a reader sees the old file or the new one, never half of one. After each save the
oldest files (in the order they were written; after a restart by modification time) are deleted until
both bounds hold; a restart scans what is there and applies the bounds again.

The colour scale is fixed relative to the model's threshold, so two overlays can be compared: each map
pixel is normalized as the scores are, (pixel - reference) / (threshold - reference) (1 = the threshold,
a typical normal pixel about 0), and coloured on a log2 scale from 1 (transparent: at or below the
threshold's level) to `SCALE_TOP` (the top of the colour map, opacity `MAP_ALPHA`). `MAP_CMAP` and
`MAP_ALPHA` are the ones of the image report (daemon/image_report.py imports them from here).

Only numpy and Pillow (and matplotlib's colour tables) are used: no figure is drawn, so a save costs a
resize, a blend and a PNG encode (tens of milliseconds for a 1024 px frame).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger("cellwatch.overlays")

MAP_CMAP: Final = "turbo"  # the colour map of every anomaly map the project draws
MAP_ALPHA: Final = 0.75  # opacity of the heat map where it reaches the top of the colour scale
SCALE_TOP: Final = 32.0  # normalized map value at the top of the colour scale (log2 scale from 1)
MAX_SIDE: Final = 1024  # the long side of an overlay at most (a larger frame is scaled down)
LEGEND_HEIGHT: Final = 18  # pixels of the legend line under the picture
PNG_COMPRESS_LEVEL: Final = 1  # zlib level: 6 (Pillow's default) takes ~4x the time for ~20 % smaller files

NAME_PART = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a robot or camera name (config's ROBOT_ID)
FILE_NAME = re.compile(r"[A-Za-z0-9_.-]+_-?[0-9]+_[0-9]+\.png")  # ROBOT_CAMERA_TIMENS_SEQ.png
LATEST = "latest"
_TMP_SUFFIX = ".tmp"


class OverlayNameError(ValueError):
    """A robot or camera name that cannot be part of a file name (outside [A-Za-z0-9_.-], 1-64 chars)."""


@dataclass(frozen=True)
class _Entry:
    size: int


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_PART.fullmatch(value):
        raise OverlayNameError(f"{kind} {value!r} cannot name an overlay file ([A-Za-z0-9_.-], 1-64 chars)")
    return value


def overlay_name(robot: str, camera: str, time_ns: int, seq: int) -> str:
    """The history file name of a frame's overlay (validated: never more than one path component)."""
    check_name("robot", robot)
    check_name("camera", camera)
    if int(seq) < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")
    return f"{robot}_{camera}_{int(time_ns)}_{int(seq)}.png"


def latest_name(robot: str, camera: str) -> str:
    """The file name under latest/ of a camera's newest overlay."""
    return f"{check_name('robot', robot)}_{check_name('camera', camera)}.png"


# --- drawing --------------------------------------------------------------------------------------------
@cache
def _lut() -> np.ndarray:
    from matplotlib import colormaps  # only the colour tables: no figure, no backend

    rgba = colormaps[MAP_CMAP](np.linspace(0.0, 1.0, 256))
    return np.round(rgba[:, :3] * 255).astype(np.uint8)


def normalize_map(amap: np.ndarray, threshold: float, reference: float = 0.0) -> np.ndarray:
    """Map pixels on the scores' scale: (pixel - reference) / (threshold - reference), threshold = 1.

    Non-finite pixels count as far above the threshold (+inf, nan) or far below (-inf)."""
    span = float(threshold) - float(reference)
    if not (math.isfinite(span) and span > 0):
        span = abs(float(threshold)) if math.isfinite(float(threshold)) and threshold != 0 else 1.0
        reference = 0.0
    out = (np.asarray(amap, dtype=np.float32) - np.float32(reference)) / np.float32(span)
    return np.nan_to_num(out, nan=SCALE_TOP, posinf=SCALE_TOP, neginf=0.0)


def map_strength(normalized: np.ndarray) -> np.ndarray:
    """0 at or below the threshold (1), 1 at `SCALE_TOP` and above, log2 in between."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.log2(np.maximum(normalized, 1.0)) / math.log2(SCALE_TOP)
    return np.clip(s, 0.0, 1.0).astype(np.float32)


def blend_heat(image: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """The image (uint8 HxWx3) under the heat map of `strength` (HxW, 0-1): colour `MAP_CMAP`, opacity
    `MAP_ALPHA` * strength in 1/255 steps (a pixel of strength 0 is the image unchanged). Table look-ups
    and Pillow's compositing: a 1024 px frame blends in a few milliseconds."""
    level = np.round(np.clip(strength, 0.0, 1.0) * 255).astype(np.uint8)
    colours = Image.fromarray(np.take(_lut(), level, axis=0))
    opacity = Image.fromarray(np.take(_alpha_lut(), level))
    return np.asarray(Image.composite(colours, Image.fromarray(image), opacity), dtype=np.uint8)


@cache
def _alpha_lut() -> np.ndarray:
    return np.round(MAP_ALPHA * np.arange(256)).astype(np.uint8)


def _output_size(image_hw: tuple[int, int], map_hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(height, width): the frame's aspect ratio, the long side between the map's and `max_side`."""
    h, w = image_hw
    long_side = max(h, w)
    target = min(max(long_side, max(map_hw)), max_side)
    if target == long_side:
        return h, w
    scale = target / long_side
    return max(1, round(h * scale)), max(1, round(w * scale))


def _legend(width: int, caption: str) -> np.ndarray:
    """A strip under the picture: the colour scale from the threshold (1) to SCALE_TOP, and a caption."""
    strip = Image.new("RGB", (width, LEGEND_HEIGHT), (24, 24, 24))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    bar_w = min(160, max(width // 3, 40))
    x0, y0, y1 = 4, 4, LEGEND_HEIGHT - 4
    ramp = np.linspace(0.0, 1.0, bar_w, dtype=np.float32)
    colours = blend_heat(np.full((1, bar_w, 3), 24, np.uint8), ramp[None, :])[0]
    for i, colour in enumerate(colours):
        draw.line([(x0 + i, y0), (x0 + i, y1)], fill=tuple(int(c) for c in colour))
    text_x = x0 + bar_w + 6
    room = width - text_x - 2
    scale = f"1 (threshold) .. {SCALE_TOP:g}x, log2"
    for text in (f"{scale} | {caption}", f"1..{SCALE_TOP:g}x | {caption}", caption, f"1..{SCALE_TOP:g}x"):
        if text and draw.textlength(text, font=font) <= room:
            draw.text((text_x, 3), text, fill=(235, 235, 235), font=font)
            break
    return np.asarray(strip, dtype=np.uint8)


def render_overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    threshold: float,
    reference: float = 0.0,
    *,
    caption: str = "",
    max_side: int = MAX_SIDE,
    legend: bool = True,
) -> np.ndarray:
    """The overlay as uint8 RGB: the frame (scaled to at most `max_side`, at least the map's size), its
    map upsampled (bilinear) over it on the fixed scale, and a legend line under it."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    amap = np.asarray(anomaly_map)
    if amap.ndim != 2 or min(amap.shape) < 1 or not np.issubdtype(amap.dtype, np.number):
        raise ValueError(f"anomaly_map must be a numeric HxW array, got {amap.dtype} {amap.shape}")
    height, width = _output_size(image.shape[:2], amap.shape, max_side)
    picture = image
    if (height, width) != image.shape[:2]:
        resample = Image.Resampling.BILINEAR
        picture = np.asarray(Image.fromarray(image).resize((width, height), resample, reducing_gap=2.0))
    normalized = normalize_map(amap, threshold, reference)
    if normalized.shape != (height, width):
        scaled = Image.fromarray(normalized, mode="F").resize((width, height), Image.Resampling.BILINEAR)
        normalized = np.asarray(scaled, dtype=np.float32)
    out = blend_heat(picture, map_strength(normalized))
    if legend:
        out = np.concatenate([out, _legend(width, caption)], axis=0)
    return out


def encode_png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a hidden temporary file next to `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# --- the store -----------------------------------------------------------------------------------------
class OverlayStore:
    """A directory of overlay PNGs, bounded by `max_files` and `max_bytes` (the history files; `latest/`
    holds one more file per camera). Thread-safe: `save` may run on any thread while the metrics
    endpoint reads files (it only ever sees complete files, or a file missing once it is deleted)."""

    def __init__(self, directory: Path, *, max_files: int, max_bytes: int) -> None:
        if max_files < 1:
            raise ValueError(f"max_files must be >= 1, got {max_files}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.directory = Path(directory)
        self.max_files = int(max_files)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._files: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._bytes = 0
        self.saved = 0
        self.deleted = 0
        self.failed = 0
        (self.directory / LATEST).mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._scan()
            self._apply_bounds()

    @property
    def files(self) -> int:
        return len(self._files)

    @property
    def bytes(self) -> int:
        return self._bytes

    def names(self) -> list[str]:
        """The history files kept, oldest first."""
        with self._lock:
            return list(self._files)

    def _scan(self) -> None:
        found: list[tuple[int, str, int]] = []
        for folder in (self.directory, self.directory / LATEST):
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.endswith(_TMP_SUFFIX) and entry.name.startswith("."):
                        self._unlink(Path(entry.path))  # a save cut short by a crash
                        continue
                    if folder is not self.directory or not FILE_NAME.fullmatch(entry.name):
                        continue  # not ours: left alone, not counted
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if entry.is_file(follow_symlinks=False):
                        found.append((st.st_mtime_ns, entry.name, st.st_size))
        for _, name, size in sorted(found):
            self._files[name] = _Entry(size)
            self._bytes += size
        if found:
            log.info("overlays: %d files (%d bytes) already in %s", len(found), self._bytes, self.directory)

    def save(
        self,
        robot: str,
        camera: str,
        time_ns: int,
        seq: int,
        image: np.ndarray,
        anomaly_map: np.ndarray,
        threshold: float,
        reference: float = 0.0,
    ) -> str:
        """Draw and write a frame's overlay; the file name relative to the directory, or "" when the
        file alone is over `max_bytes` (it is not kept; latest/ still shows it).

        `image`: the frame, uint8 HxWx3, at any size (the camera's own is best: the overlay keeps its
        aspect ratio); `anomaly_map`: float HxW at the model's input size; `threshold` and `reference`
        (the model card's threshold value and median calibration score) fix the colour scale.
        Raises OverlayNameError (a ValueError) for a robot or camera that cannot name a file, ValueError
        for arrays of the wrong shape, OSError when the disk refuses the write (counted in `failed`)."""
        name = overlay_name(robot, camera, time_ns, seq)
        latest = latest_name(robot, camera)
        when = datetime.fromtimestamp(int(time_ns) / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        normalized_peak = float(np.max(normalize_map(np.asarray(anomaly_map), threshold, reference)))
        caption = f"{robot}/{camera} #{int(seq)} {when} UTC, map peak {normalized_peak:.1f}"
        data = encode_png(render_overlay(image, anomaly_map, threshold, reference, caption=caption))
        with self._lock:
            try:
                _write_atomic(self.directory / name, data)
            except OSError:
                self.failed += 1
                raise
            self.saved += 1
            old = self._files.pop(name, None)  # the same frame written again: replaced, now the newest
            if old is not None:
                self._bytes -= old.size
            self._files[name] = _Entry(len(data))
            self._bytes += len(data)
            try:
                _write_atomic(self.directory / LATEST / latest, data)
            except OSError as err:  # the history file is there: the frame's overlay is saved
                self.failed += 1
                log.warning("overlay %s saved, latest/%s not replaced: %s", name, latest, err)
            self._apply_bounds()
            return name if name in self._files else ""

    def _apply_bounds(self) -> None:
        while self._files and (len(self._files) > self.max_files or self._bytes > self.max_bytes):
            name, entry = self._files.popitem(last=False)
            self._bytes -= entry.size
            if self._unlink(self.directory / name):
                self.deleted += 1

    def _unlink(self, path: Path) -> bool:
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False  # someone else removed it: it no longer counts either way
        except OSError as err:  # stays on disk, no longer counted: one stuck file must not empty the rest
            log.warning("overlay %s not deleted: %s", path, err)
            return False

    def metric_samples(self) -> list[tuple[str, str, dict[str, str], float]]:
        """Read without the lock (a scrape never waits for a slow disk): each value is current."""
        return [
            ("cellwatch_overlays_saved_total", "counter", {}, self.saved),
            ("cellwatch_overlays_deleted_total", "counter", {}, self.deleted),
            ("cellwatch_overlays_failed_total", "counter", {}, self.failed),
            ("cellwatch_overlay_files", "gauge", {}, len(self._files)),
            ("cellwatch_overlay_bytes", "gauge", {}, self._bytes),
        ]
