"""Read an image data set in the MVTec AD layout.

    DIR/train/good/*.png|jpg            normal images to train on
    DIR/test/good/*                     normal images to test on
    DIR/test/<defect>/*                 anomalous images, one folder per defect type
    DIR/ground_truth/<defect>/<stem>_mask.png   optional masks (non-zero = defect)

Every image comes back as uint8 RGB, H x W x 3: grey is replicated, an alpha channel is dropped (not
composited), 16-bit grey is scaled down. A file that cannot be an image we accept (too big on disk, more
pixels than allowed -- checked from the header before anything is decoded --, zero size, not PNG or JPEG,
truncated or corrupt) is rejected with a reason, counted in `MvtecDataset.rejections` and logged
(rate-limited); reading goes on with the next file. A folder that is not in the layout raises
`MvtecLayoutError` naming the path that is missing.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ingest.errors import IngestError
from ingest.stream import Rejections

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 1024 * 1024
"""A file larger than this on disk is rejected unread."""
MAX_PIXELS = 40_000_000
"""An image whose header declares more pixels than this is rejected before decoding (a decompression bomb)."""
SUFFIXES = (".png", ".jpg", ".jpeg")
FORMATS = ("PNG", "JPEG")
GOOD = "good"
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error, EOFError, Image.DecompressionBombError)


class MvtecLayoutError(IngestError):
    """The folder is not in the MVTec AD layout; the message names the missing path."""


class ImageRejected(IngestError):
    """One file cannot be read as an image; `reason` is a short metric label."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


@dataclass(frozen=True)
class ImageItem:
    """One image: `label` is "good" or the defect type; `mask` (H x W bool, True = defect) where one exists.

    Good images carry no mask (they have no defect: an evaluator treats them as all-False)."""

    path: Path
    image: np.ndarray
    label: str
    mask: np.ndarray | None


def _open(path: Path, max_bytes: int, max_pixels: int) -> Image.Image:
    """Open and decode `path` with every bound checked; raises ImageRejected."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageRejected("unreadable", f"{path}: {err.strerror or err}") from err
    if size == 0:
        raise ImageRejected("empty", f"{path}: empty file")
    if size > max_bytes:
        raise ImageRejected("file_too_large", f"{path}: {size} bytes, more than the limit of {max_bytes}")
    return _decode(path, str(path), max_pixels)


def _decode(source: Path | io.BytesIO, where: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns (and above 2x errors) past its own MAX_IMAGE_PIXELS: both are a rejection here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(source, formats=FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageRejected("too_many_pixels", f"{where}: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageRejected("not_an_image", f"{where}: not a PNG or JPEG image") from err
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as err:
        raise ImageRejected("unreadable", f"{where}: {err}") from err
    try:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageRejected("zero_size", f"{where}: image is {width}x{height}")
        if width * height > max_pixels:
            raise ImageRejected(
                "too_many_pixels",
                f"{where}: {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}",
            )
        try:
            im.load()
            upright = ImageOps.exif_transpose(im)
        except _DECODE_ERRORS as err:
            raise ImageRejected("unreadable", f"{where}: corrupt or truncated image ({err})") from err
        if upright is not im:
            im.close()
        return upright
    except ImageRejected:
        im.close()
        raise


def decode_image(
    data: bytes, *, where: str = "image", max_bytes: int = MAX_FILE_BYTES, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Decode a PNG or JPEG payload (a camera message) as uint8 RGB, H x W x 3, with the same bounds and
    reasons as `read_image`. Raises ImageRejected; `where` names the payload in the reason's text. CPU
    work: call it off the event loop."""
    if not data:
        raise ImageRejected("empty", f"{where}: empty payload")
    if len(data) > max_bytes:
        raise ImageRejected(
            "file_too_large", f"{where}: {len(data)} bytes, more than the limit of {max_bytes}"
        )
    im = _decode(io.BytesIO(data), where, max_pixels)
    with im:
        return _to_rgb(im)


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(im).astype(np.uint32)
        grey = ((wide * 255 + 32767) // 65535).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode != "RGB":
        # RGBA/LA -> RGB drops alpha; L, 1, P, CMYK, YCbCr are converted by PIL
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def read_image(path: Path, *, max_bytes: int = MAX_FILE_BYTES, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a PNG or JPEG as uint8 RGB, H x W x 3. Raises ImageRejected with a reason."""
    im = _open(Path(path), max_bytes, max_pixels)
    with im:
        return _to_rgb(im)


def read_mask(path: Path, *, max_bytes: int = MAX_FILE_BYTES, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a mask as H x W bool (True where the grey value is above half). Raises ImageRejected."""
    im = _open(Path(path), max_bytes, max_pixels)
    with im:
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGB")
        grey = np.asarray(im.convert("L"))
    return grey > 127


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(height), int(width)


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize uint8 RGB (H x W x 3) to `size` (an int for a square, or (height, width)) with bicubic PIL."""
    height, width = _hw(size)
    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a mask (bool or uint8) to `size` with nearest neighbour; returns bool."""
    height, width = _hw(size)
    binary = np.asarray(mask) > (0 if mask.dtype == np.bool_ else 127)
    if binary.shape == (height, width):
        return binary
    im = Image.fromarray(binary.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(im) > 127


class MvtecDataset:
    """An MVTec-AD-layout folder. `train()` and `test()` yield `ImageItem`s in sorted file order.

    `size` (an int or (height, width)) resizes every image (bicubic) and mask (nearest) on read.
    Rejected files are skipped and counted in `rejections` (reason -> count); a defect image whose
    mask file is absent is kept with `mask=None` and counted in `missing_masks`.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        size: int | tuple[int, int] | None = None,
        max_bytes: int = MAX_FILE_BYTES,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        self.root = Path(root)
        self.size = None if size is None else _hw(size)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.rejections = Rejections()
        self.missing_masks = 0
        self._folder(self.root)
        self._folder(self.root / "train")
        self._folder(self.root / "train" / GOOD)

    @staticmethod
    def _folder(path: Path) -> Path:
        if not path.exists():
            raise MvtecLayoutError(f"{path}: missing (not the MVTec AD layout: train/good, test/good, …)")
        if not path.is_dir():
            raise MvtecLayoutError(f"{path}: not a directory")
        return path

    @property
    def defect_types(self) -> list[str]:
        """The defect folders under test/ (every subfolder but good), sorted."""
        test = self._folder(self.root / "test")
        return sorted(p.name for p in test.iterdir() if p.is_dir() and p.name != GOOD)

    def train(self) -> Iterator[ImageItem]:
        """The normal training images (train/good)."""
        return self._items(self.root / "train" / GOOD, GOOD)

    def test(self) -> Iterator[ImageItem]:
        """test/good, then each defect folder in sorted order. Checks the layout before yielding."""
        self._folder(self.root / "test")
        self._folder(self.root / "test" / GOOD)
        defects = self.defect_types
        return self._test_items(defects)

    def _test_items(self, defects: list[str]) -> Iterator[ImageItem]:
        yield from self._items(self.root / "test" / GOOD, GOOD)
        for defect in defects:
            yield from self._items(self.root / "test" / defect, defect)

    def _files(self, folder: Path) -> Iterator[Path]:
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue  # .DS_Store and friends
            if not path.is_file() or path.suffix.lower() not in SUFFIXES:
                self._reject(ImageRejected("not_an_image_file", f"{path}: not a .png, .jpg or .jpeg file"))
                continue
            yield path

    def _reject(self, err: ImageRejected) -> None:
        self.rejections.add(err.reason, str(err), log)

    def _items(self, folder: Path, label: str) -> Iterator[ImageItem]:
        for path in self._files(folder):
            try:
                image = read_image(path, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
                mask = None if label == GOOD else self._mask(path, label, image.shape[:2])
            except ImageRejected as err:
                self._reject(err)
                continue
            if self.size is not None:
                image = resize_image(image, self.size)
                mask = None if mask is None else resize_mask(mask, self.size)
            yield ImageItem(path=path, image=image, label=label, mask=mask)

    def _mask(self, path: Path, label: str, shape: tuple[int, ...]) -> np.ndarray | None:
        mask_path = self.root / "ground_truth" / label / f"{path.stem}_mask.png"
        if not mask_path.exists():
            self.missing_masks += 1
            return None
        mask = read_mask(mask_path, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
        if mask.shape != tuple(shape):
            raise ImageRejected(
                "mask_shape",
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, image is {shape[1]}x{shape[0]}",
            )
        return mask

    def metric_samples(self) -> list[tuple[str, str, dict[str, str], float]]:
        """Rejected image files by reason (`cellwatch_image_rejects_total`)."""
        return [
            ("cellwatch_image_rejects_total", "counter", {"reason": reason}, float(count))
            for reason, count in sorted(self.rejections.items())
        ]
