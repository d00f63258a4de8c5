"""Image data on the MVTec AD layout: the generator (real skimage textures with painted defects) and
the reader (every PNG/JPEG mode to uint8 RGB, bad files rejected with a reason and counted, layout
errors named)."""

from __future__ import annotations

import hashlib
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ingest.images import MvtecDataset, MvtecLayoutError, read_image, resize_image, resize_mask
from ingest.sim.images import (
    DEFECTS,
    MASK_ALPHA,
    load_texture,
    make_normal,
    paint_defect,
    write_image_dataset,
)

SIZE = 64


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gen") / "brick"
    write_image_dataset(root, seed=3, n_train=5, n_test_good=3, n_per_defect=2, size=SIZE)
    return root


def test_generator_writes_the_layout_with_the_asked_counts(generated: Path) -> None:
    assert len(list((generated / "train" / "good").glob("*.png"))) == 5
    assert len(list((generated / "test" / "good").glob("*.png"))) == 3
    for defect in DEFECTS:
        images = sorted((generated / "test" / defect).glob("*.png"))
        assert len(images) == 2
        for image in images:
            mask_path = generated / "ground_truth" / defect / f"{image.stem}_mask.png"
            mask = np.asarray(Image.open(mask_path))
            assert mask.shape == (SIZE, SIZE)
            assert set(np.unique(mask)) <= {0, 255}
            assert (mask == 255).sum() > 0, f"{mask_path} is empty"
    assert not (generated / "ground_truth" / "good").exists()


def test_images_are_real_texture_not_flat(generated: Path) -> None:
    image = np.asarray(Image.open(generated / "train" / "good" / "000.png"))
    assert image.shape == (SIZE, SIZE, 3)
    assert image.dtype == np.uint8
    assert image.std() > 10  # a photographed texture, not a flat square
    first, second = (np.asarray(Image.open(generated / "train" / "good" / f)) for f in ("000.png", "001.png"))
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 5  # different crops


@pytest.mark.parametrize("defect", DEFECTS)
def test_mask_covers_what_the_defect_changed(defect: str) -> None:
    texture = load_texture("brick")
    for seed in range(4):
        rng = np.random.default_rng(seed)
        clean = make_normal(texture, rng, 96)
        damaged, mask = paint_defect(clean, defect, rng)
        change = np.abs(damaged.astype(int) - clean.astype(int)).max(axis=2)
        assert mask.any()
        strong = change > MASK_ALPHA * 255 + 1
        assert strong.any(), f"{defect} changed nothing visibly"
        assert mask[strong].all(), "a pixel changed strongly outside the mask"
        # the mask is not much larger than the defect: most of it did change
        assert (change[mask] > 2).mean() > 0.6
        # and the defect is local: most of the image is untouched
        assert (change[~mask] <= MASK_ALPHA * 255 + 1).all()
        assert mask.mean() < 0.35


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path, generated: Path) -> None:
    again = tmp_path / "again"
    write_image_dataset(again, seed=3, n_train=5, n_test_good=3, n_per_defect=2, size=SIZE)
    assert digests(again) == digests(generated)
    other = tmp_path / "other"
    write_image_dataset(other, seed=4, n_train=5, n_test_good=3, n_per_defect=2, size=SIZE)
    theirs = digests(other)
    assert theirs.keys() == digests(generated).keys()
    same = [k for k, v in digests(generated).items() if theirs[k] == v]
    assert same == []


def test_generator_rejects_unknown_category_and_defect(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown image category 'skin'"):
        write_image_dataset(tmp_path, n_train=1, n_test_good=1, n_per_defect=1, size=32, category="skin")
    with pytest.raises(ValueError, match="unknown defects"):
        write_image_dataset(tmp_path, n_train=1, n_test_good=1, n_per_defect=1, size=32, defects=["dent"])


def test_reader_reads_the_generated_set_back(generated: Path) -> None:
    data = MvtecDataset(generated)
    train = list(data.train())
    assert len(train) == 5
    assert {item.label for item in train} == {"good"}
    assert all(item.mask is None and item.image.shape == (SIZE, SIZE, 3) for item in train)
    test = list(data.test())
    labels = [item.label for item in test]
    assert labels.count("good") == 3
    assert sorted(set(labels) - {"good"}) == sorted(DEFECTS) == data.defect_types
    for item in test:
        assert item.image.dtype == np.uint8
        if item.label == "good":
            assert item.mask is None
        else:
            assert item.mask is not None
            assert item.mask.shape == item.image.shape[:2]
            assert item.mask.dtype == np.bool_
            assert item.mask.any()
    on_disk = np.asarray(Image.open(generated / "test" / "hole" / "001.png"))
    hole = next(i for i in test if i.label == "hole" and i.path.name == "001.png")
    assert np.array_equal(hole.image, on_disk)
    assert sum(data.rejections.values()) == 0
    assert data.missing_masks == 0


def test_reader_resizes_images_and_masks(generated: Path) -> None:
    data = MvtecDataset(generated, size=(40, 48))
    items = [i for i in data.test() if i.label == "scratch"]
    for item in items:
        assert item.image.shape == (40, 48, 3)
        assert item.mask is not None
        assert item.mask.shape == (40, 48)
        assert item.mask.any()
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[2:5, 2:5] = 255
    big = resize_mask(mask, 20)
    assert big.dtype == np.bool_
    assert big.sum() == 36  # nearest: 3x3 block becomes 6x6, still binary
    assert resize_image(np.zeros((10, 20, 3), np.uint8), (5, 7)).shape == (5, 7, 3)


def make_layout(root: Path) -> Path:
    for folder in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (root / folder).mkdir(parents=True)
    return root


def test_grey_rgba_jpeg_and_16_bit_become_rgb(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "modes")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, size=(30, 40), dtype=np.uint8)
    rgba = np.dstack([rgb, np.full((30, 40), 7, np.uint8)])
    Image.fromarray(grey, mode="L").save(root / "train/good/a_grey.png")
    Image.fromarray(rgba, mode="RGBA").save(root / "train/good/b_rgba.png")
    yy, xx = np.mgrid[0:30, 0:40]
    smooth = np.dstack([xx * 6, yy * 8, 255 - xx * 6]).astype(np.uint8)  # JPEG keeps smooth pictures
    Image.fromarray(smooth).save(root / "train/good/c_photo.JPG", format="JPEG", quality=95)
    Image.fromarray(grey.astype(np.uint16) * 257).save(root / "train/good/d_16bit.png")
    Image.fromarray(grey, mode="L").convert("P").save(root / "train/good/e_palette.png")
    items = {i.path.name: i.image for i in MvtecDataset(root).train()}
    assert sorted(items) == ["a_grey.png", "b_rgba.png", "c_photo.JPG", "d_16bit.png", "e_palette.png"]
    for image in items.values():
        assert image.shape == (30, 40, 3)
        assert image.dtype == np.uint8
    assert np.array_equal(items["a_grey.png"], np.dstack([grey] * 3))
    assert np.array_equal(items["b_rgba.png"], rgb)  # alpha dropped, not composited
    assert np.abs(items["c_photo.JPG"].astype(int) - smooth.astype(int)).mean() < 4  # lossy, same picture
    assert np.array_equal(items["d_16bit.png"], np.dstack([grey] * 3))
    assert np.array_equal(items["e_palette.png"], np.dstack([grey] * 3))


def png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR is rewritten to claim width x height (a decompression bomb header)."""
    import io

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8  # after the signature: length(4) 'IHDR'(4) data(13) crc(4)
    data[ihdr + 8 : ihdr + 16] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21]))
    data[ihdr + 21 : ihdr + 25] = crc.to_bytes(4, "big")
    return bytes(data)


def test_bad_files_are_rejected_with_reasons_and_the_rest_is_read(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "bad")
    good = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(good).save(root / "train/good/000.png")
    Image.fromarray(good).save(root / "train/good/009.png")
    whole = (root / "train/good/000.png").read_bytes()
    (root / "train/good/001.png").write_bytes(whole[: len(whole) // 2])  # truncated
    (root / "train/good/002.png").write_bytes(b"this is not an image at all")
    (root / "train/good/003.png").write_bytes(b"")
    (root / "train/good/004.png").write_bytes(png_claiming(100_000, 100_000))  # 10^10 pixels
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(root / "train/good/005.png")  # over our bound
    (root / "train/good/006.txt").write_text("notes")
    (root / "train/good/.DS_Store").write_bytes(b"\0")
    data = MvtecDataset(root, max_pixels=200 * 200)
    names = [item.path.name for item in data.train()]
    assert names == ["000.png", "009.png"]
    assert dict(data.rejections) == {
        "unreadable": 1,
        "not_an_image": 1,
        "empty": 1,
        "too_many_pixels": 2,
        "not_an_image_file": 1,
    }
    assert ("cellwatch_image_rejects_total", "counter", {"reason": "too_many_pixels"}, 2.0) in (
        data.metric_samples()
    )


def test_oversized_file_and_bomb_rejected_with_default_bounds(tmp_path: Path) -> None:
    from ingest.images import ImageRejected

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(100_000, 100_000))
    with pytest.raises(ImageRejected, match="pixels") as err:
        read_image(bomb)
    assert err.value.reason == "too_many_pixels"
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(big)
    with pytest.raises(ImageRejected, match="bytes, more than the limit") as err:
        read_image(big, max_bytes=10)
    assert err.value.reason == "file_too_large"


def test_mask_problems(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "masks")
    image = np.zeros((20, 30, 3), np.uint8)
    for stem in ("a", "b", "c"):
        Image.fromarray(image).save(root / f"test/crack/{stem}.png")
    Image.fromarray(np.full((20, 30), 255, np.uint8)).save(root / "ground_truth/crack/a_mask.png")
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(root / "ground_truth/crack/b_mask.png")  # 10x10
    data = MvtecDataset(root)
    items = {i.path.stem: i for i in data.test()}
    assert sorted(items) == ["a", "c"]
    assert items["a"].mask is not None
    assert items["a"].mask.all()
    assert items["c"].mask is None  # masks are optional: kept, counted
    assert data.missing_masks == 1
    assert dict(data.rejections) == {"mask_shape": 1}


@pytest.mark.parametrize("missing", ["", "train", "train/good", "test", "test/good"])
def test_folder_not_in_the_layout_names_what_is_missing(tmp_path: Path, missing: str) -> None:
    root = tmp_path / "data"
    make_layout(root)
    target = root / missing if missing else root
    for path in sorted(target.rglob("*"), reverse=True):
        path.rmdir()
    target.rmdir()
    with pytest.raises(MvtecLayoutError, match=re.escape(f"{target}: missing")):
        MvtecDataset(root).test()


def test_layout_path_that_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "train" / "good").write_text("oops")
    with pytest.raises(MvtecLayoutError, match="train/good: not a directory"):
        MvtecDataset(root)


def test_crops_are_spread_over_the_photograph_and_never_near_copies() -> None:
    """Train and test crops come from one process: held-out training images are as new to a model as test
    images (a threshold calibrated on them must hold on the test set), and no two images nearly coincide."""
    from ingest.sim.images import crop_positions, load_texture

    texture = load_texture("gravel")
    positions = crop_positions(texture, np.random.default_rng(3), 110)
    assert len(positions) == 110
    corners = np.array([(y, x) for y, x, _ in positions], dtype=float)
    distances = np.sqrt(((corners[:, None] - corners[None]) ** 2).sum(-1)) + np.eye(110) * 1e9
    side = np.mean([s for _, _, s in positions])
    assert distances.min() >= 0.05 * side  # never the same crop twice
    h, w = texture.shape[:2]
    centres = corners + side / 2
    quadrants = {(bool(cy >= h / 2), bool(cx >= w / 2)) for cy, cx in centres}
    assert len(quadrants) == 4  # all over the photograph, no region held back
