"""Write an MVTec-AD-layout image data set from real photographed textures, with painted defects.

The normal images are crops of a real texture photograph that scikit-image ships (`skimage.data`:
brick, grass or gravel; nothing is downloaded), tinted with a fixed colour ramp per category (the
photographs are grey; colour makes stains and colour shifts visible), with small jitter in position,
scale and brightness and a random horizontal flip. Every image of a set, training or test, is drawn by
one process, as the parts a camera sees are: the crop positions of the whole set are spread over the
photograph with a minimum distance between any two (so no image is a near-copy of another) and dealt
out to the folders at random, so held-out training images are as new to a model as test images are and
a threshold calibrated on them holds on the test set. (An earlier version cut the test crops from a
quadrant that training never saw: a well-trained model then flagged every good test image, because
held-out training crops shared content with the training crops and the test crops did not.)

Defects are painted on a clean test crop at the output size, each with a soft alpha `a` in [0, 1]:
`out = clean * (1 - a) + painted * a`. The mask (255 = defect) is `a > MASK_ALPHA`, so every pixel
that a defect changed by more than `MASK_ALPHA * 255` grey levels lies inside the mask.

    scratch      thin bright or dark anti-aliased curve (a quadratic Bezier)
    hole         dark elliptic blob, darker at its centre, soft edge
    stain        translucent colour blob with an irregular outline
    missing      an irregular region replaced by a blurred, desaturated background fill
    color_shift  an irregular region with its hue rotated and saturation raised

The same seed gives byte-identical files (numpy's seeded Generator; PIL writes PNGs without timestamps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import color
from skimage import data as skdata

DEFECTS = ("scratch", "hole", "stain", "missing", "color_shift")
MASK_ALPHA = 0.1
# category -> (skimage.data loader name, dark colour, light colour) of the tint ramp
CATEGORIES: dict[str, tuple[str, tuple[int, int, int], tuple[int, int, int]]] = {
    "brick": ("brick", (70, 30, 20), (235, 165, 125)),
    "grass": ("grass", (20, 45, 15), (175, 215, 120)),
    "gravel": ("gravel", (45, 40, 35), (225, 215, 195)),
}
_CROP_FRACTION = 0.375  # of the texture's short side


def load_texture(category: str) -> np.ndarray:
    """The category's photograph as float RGB (H x W x 3, 0..255), tinted by its colour ramp."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown image category {category!r}; choose one of {sorted(CATEGORIES)}")
    name, dark, light = CATEGORIES[category]
    grey = np.asarray(getattr(skdata, name)(), dtype=np.float64)
    if grey.ndim == 3:
        grey = grey[..., :3].mean(axis=2)
    t = (grey / 255.0)[..., None]
    return np.asarray(dark, dtype=np.float64) * (1 - t) + np.asarray(light, dtype=np.float64) * t


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def crop_positions(texture: np.ndarray, rng: np.random.Generator, count: int) -> list[tuple[int, int, int]]:
    """(y, x, side) of `count` crops spread over `texture`: uniform, but no two top-left corners closer
    than about half the mean spacing (relaxed step by step when the photograph is too small for it)."""
    height, width = texture.shape[:2]
    base = _CROP_FRACTION * min(height, width)
    span = max(1.0, (height - base) * (width - base))
    min_dist = 0.5 * math.sqrt(span / max(count, 1))
    out: list[tuple[int, int, int]] = []
    while len(out) < count:
        side = round(base * rng.uniform(0.94, 1.06))
        for _ in range(200):
            y = int(rng.integers(0, height - side + 1))
            x = int(rng.integers(0, width - side + 1))
            if all((y - oy) ** 2 + (x - ox) ** 2 >= min_dist**2 for oy, ox, _s in out):
                out.append((y, x, side))
                break
        else:
            min_dist *= 0.9  # crowded: accept closer crops rather than fail
    return out


def make_normal(
    texture: np.ndarray,
    rng: np.random.Generator,
    size: int,
    position: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """A jittered crop of `texture` at `position` (y, x, side; random when None), resized to size x size,
    as uint8 RGB."""
    if position is None:
        position = crop_positions(texture, rng, 1)[0]
    y, x, side = position
    crop = texture[y : y + side, x : x + side] * rng.uniform(0.94, 1.06) + rng.uniform(-6, 6)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    resized = Image.fromarray(_to_uint8(crop)).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy + 0.5, xx + 0.5


def _blob_alpha(rng: np.random.Generator, size: int, radius: tuple[float, float], edge: float) -> np.ndarray:
    """A soft irregular blob: an ellipse whose radius wobbles with angle, edge `edge` px wide."""
    yy, xx = _grid(size)
    cy, cx = rng.uniform(0.25, 0.75, size=2) * size
    ry, rx = rng.uniform(*radius, size=2) * size
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
    angle = np.arctan2(v, u)
    wobble = 1.0
    for k in (2, 3, 5):
        wobble = wobble + rng.uniform(0, 0.12) * np.sin(k * angle + rng.uniform(0, 2 * np.pi))
    r = np.hypot(u, v) / wobble  # 1 on the outline
    dist_px = (r - 1.0) * min(rx, ry)  # roughly pixels outside the outline
    return np.clip(0.5 - dist_px / edge, 0.0, 1.0)


def _scratch(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    yy, xx = _grid(size)
    p0, p1, p2 = (rng.uniform(0.1, 0.9, size=2) * size for _ in range(3))
    length = np.hypot(*(p2 - p0))
    if length < 0.3 * size:  # make it long enough to see
        p2 = p0 + (p2 - p0) * (0.3 * size / max(length, 1e-6))
    t = np.linspace(0, 1, max(64, 4 * size))[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # (n, 2) as (y, x)
    dist = np.full((size, size), np.inf)
    for cy, cx in curve:
        np.minimum(dist, np.hypot(yy - cy, xx - cx), out=dist)
    width = rng.uniform(0.8, 2.0) * max(1.0, size / 128)
    alpha = np.clip(width / 2 + 0.5 - dist, 0.0, 1.0) * rng.uniform(0.85, 1.0)
    bright = rng.random() < 0.5
    painted = np.full_like(clean, 250.0 if bright else 15.0)
    return painted, alpha


def _hole(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    alpha = _blob_alpha(rng, size, (0.05, 0.12), edge=max(1.5, size / 64))
    depth = ndimage.gaussian_filter(alpha, sigma=max(1.0, size / 40))  # darker towards the centre
    painted = clean * 0.12 * (1.0 - 0.7 * depth[..., None]) + 4.0
    return painted, alpha


def _stain(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    shape = _blob_alpha(rng, size, (0.08, 0.18), edge=max(2.0, size / 32))
    tint = np.asarray([(95, 60, 25), (40, 70, 120), (120, 120, 30), (30, 30, 30)][int(rng.integers(0, 4))])
    painted = clean * 0.35 + tint * 0.65
    alpha = shape * rng.uniform(0.45, 0.7)
    return painted, alpha


def _missing(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    alpha = _blob_alpha(rng, size, (0.1, 0.2), edge=max(1.0, size / 128))
    blurred = ndimage.gaussian_filter(clean, sigma=(size / 10, size / 10, 0))
    background = np.asarray([70.0, 72.0, 78.0])  # the grey table under the part
    painted = 0.3 * blurred + 0.7 * background
    return painted, alpha


def _color_shift(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    alpha = _blob_alpha(rng, size, (0.1, 0.2), edge=max(2.0, size / 32))
    hsv = color.rgb2hsv(np.clip(clean / 255.0, 0.0, 1.0))
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(0.2, 0.45) * rng.choice([-1.0, 1.0])) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1.4, 2.0) + 0.1, 0.0, 1.0)
    painted = color.hsv2rgb(hsv) * 255.0
    return painted, alpha


_PAINTERS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "missing": _missing,
    "color_shift": _color_shift,
}


def paint_defect(clean: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one `kind` defect on a square uint8 RGB image; returns (image uint8, mask bool)."""
    if kind not in _PAINTERS:
        raise ValueError(f"unknown defect {kind!r}; choose from {list(DEFECTS)}")
    base = clean.astype(np.float64)
    painted, alpha = _PAINTERS[kind](base, rng)
    out = base * (1 - alpha[..., None]) + painted * alpha[..., None]
    return _to_uint8(out), alpha > MASK_ALPHA


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG", optimize=False)


def write_image_dataset(
    out_dir: Path | str,
    *,
    seed: int = 0,
    n_train: int = 60,
    n_test_good: int = 20,
    n_per_defect: int = 10,
    size: int = 256,
    category: str = "brick",
    defects: Sequence[str] = DEFECTS,
) -> dict[str, int]:
    """Write the data set under `out_dir`; returns the number of images per folder ("train/good", ...).

    Files are named 000.png, 001.png, ...; masks ground_truth/<defect>/<stem>_mask.png (0 or 255)."""
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    for name, count in (("n_train", n_train), ("n_test_good", n_test_good), ("n_per_defect", n_per_defect)):
        if count < 0:
            raise ValueError(f"{name} must be >= 0, got {count}")
    unknown = [d for d in defects if d not in _PAINTERS]
    if unknown:
        raise ValueError(f"unknown defects {unknown}; choose from {list(DEFECTS)}")
    root = Path(out_dir)
    texture = load_texture(category)
    rng = np.random.default_rng(seed)
    total = n_train + n_test_good + n_per_defect * len(defects)
    # one process for every split: positions spread over the photograph, dealt out at random
    positions = iter([crop_positions(texture, rng, total)[i] for i in rng.permutation(total)])
    counts: dict[str, int] = {}
    for i in range(n_train):
        _save(make_normal(texture, rng, size, next(positions)), root / "train" / "good" / f"{i:03d}.png")
    counts["train/good"] = n_train
    for i in range(n_test_good):
        _save(make_normal(texture, rng, size, next(positions)), root / "test" / "good" / f"{i:03d}.png")
    counts["test/good"] = n_test_good
    for defect in defects:
        for i in range(n_per_defect):
            image, mask = paint_defect(make_normal(texture, rng, size, next(positions)), defect, rng)
            _save(image, root / "test" / defect / f"{i:03d}.png")
            _save(mask.astype(np.uint8) * 255, root / "ground_truth" / defect / f"{i:03d}_mask.png")
        counts[f"test/{defect}"] = n_per_defect
    return counts
