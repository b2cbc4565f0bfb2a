"""Object masks for the pointing games: the sample layout, resizing, and bad files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saliaudit.errors import ImageError
from saliaudit.masks import load_masks, mask_folder, mask_skip_reason

from .checks_util import SAMPLES

SHAPES = ["circle", "square", "triangle", "cross"]


def _save(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def _disk(h: int = 40, w: int = 40, cy: int = 20, cx: int = 20, r: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, 255, 0).astype(np.uint8)


def test_sample_masks_load_at_input_size():
    masks = load_masks(SAMPLES / "masks" / "shapes", "circle/000.png", SHAPES, (64, 64))
    assert list(masks) == [0]
    m = masks[0]
    assert m.dtype == bool and m.shape == (64, 64) and 0 < m.mean() < 0.5
    raw = np.asarray(Image.open(SAMPLES / "masks/shapes/circle/000/circle.png")) > 127
    assert np.array_equal(m, raw)  # same size: untouched
    pairs = load_masks(SAMPLES / "masks" / "shapes_pairs", "000.png", SHAPES, (64, 64))
    assert len(pairs) == 2 and not (pairs[min(pairs)] & pairs[max(pairs)]).any()
    # every shipped mask loads (the layout of sample_models/README.md)
    for d in ("shapes", "shapes_pairs"):
        for img in (SAMPLES / "images" / d).rglob("*.png"):
            rel = img.relative_to(SAMPLES / "images" / d).as_posix()
            assert load_masks(SAMPLES / "masks" / d, rel, SHAPES, (64, 64)), rel
            assert mask_skip_reason(SAMPLES / "masks" / d, rel) is None


def test_resize_follows_the_image_and_thresholds_at_half(tmp_path):
    a = np.zeros((40, 80), np.uint8)
    a[10:30, 40:80] = 255  # right half, rows 10-29
    _save(tmp_path / "img" / "1.png", a)
    m = load_masks(tmp_path, "img.jpg", ["a", "1"], (20, 20))[1]
    assert m.shape == (20, 20)
    expected = np.zeros((20, 20), bool)
    expected[5:15, 10:20] = True  # halved vertically, quartered horizontally: exact boundaries
    assert np.array_equal(m, expected)
    # an object thinner than half an output pixel keeps its best-covered pixels
    thin = np.zeros((40, 40), np.uint8)
    thin[:, 21] = 255
    _save(tmp_path / "thin" / "a.png", thin)
    m = load_masks(tmp_path, "thin.png", ["a"], (10, 10))[0]
    assert m.any() and m[:, 5].all() and m.sum() == 10


def test_class_by_name_case_or_index_and_no_folder(tmp_path):
    for name in ("Circle.png", "3.png"):
        _save(tmp_path / "x" / "y" / name, _disk())
    masks = load_masks(tmp_path, "x/y.png", SHAPES, (40, 40))
    assert sorted(masks) == [0, 3]
    (tmp_path / "x" / "y" / "notes.txt").write_text("not a mask")
    (tmp_path / "x" / "y" / ".DS_Store").write_bytes(b"\0")
    assert sorted(load_masks(tmp_path, "x/y.png", SHAPES, (40, 40))) == [0, 3]
    assert load_masks(tmp_path, "x/none.png", SHAPES, (40, 40)) == {}
    reason = mask_skip_reason(tmp_path, "x/none.png")
    assert "no mask folder" in reason and str(mask_folder(tmp_path, "x/none.png")) in reason
    (tmp_path / "empty").mkdir()
    assert "no mask file" in mask_skip_reason(tmp_path, "empty.png")
    # digit class names match by name before index
    digits = [str(i) for i in range(10)][::-1]  # "9", "8", ...: name "3" is index 6
    assert sorted(load_masks(tmp_path, "x/y.png", digits + ["circle"], (40, 40))) == [6, 10]


def _bad(tmp_path: Path, name: str, data) -> Path:
    folder = tmp_path / "bad"
    if folder.exists():
        for p in folder.iterdir():
            p.unlink()
    if isinstance(data, bytes):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        return folder / name
    return _save(folder / name, data)


@pytest.mark.parametrize(
    "name,data,words",
    [
        ("circle.png", b"this is not a png", "cannot be read"),
        ("circle.png", (_disk() // 255 * 128).astype(np.uint8), "not binary"),
        ("circle.png", np.linspace(0, 255, 1600).reshape(40, 40).astype(np.uint8), "not binary"),
        ("circle.png", np.zeros((40, 40), np.uint8), "empty"),
        ("circle.png", np.dstack([_disk(), _disk() * 0, _disk()]), "coloured"),
        ("dog.png", _disk(), "unknown class 'dog'"),
        ("7.png", _disk(), "unknown class '7'"),
    ],
)
def test_bad_masks_raise_one_line_image_errors(tmp_path, name, data, words):
    path = _bad(tmp_path, name, data)
    with pytest.raises(ImageError) as err:
        load_masks(tmp_path, "bad.png", SHAPES, (40, 40))
    msg = str(err.value)
    assert words in msg and str(path) in msg and "\n" not in msg
    assert "(" in msg  # says what to do


def test_size_mismatch_and_duplicates(tmp_path):
    _save(tmp_path / "a" / "circle.png", _disk())
    _save(tmp_path / "a" / "square.png", _disk(40, 60, 20, 30))
    with pytest.raises(ImageError, match="40x40"):
        load_masks(tmp_path, "a.png", SHAPES, (40, 40))
    (tmp_path / "a" / "square.png").unlink()
    with pytest.raises(ImageError, match="aspect ratio"):
        load_masks(tmp_path, "a.png", SHAPES, (40, 40), image_size=(80, 40))
    assert list(load_masks(tmp_path, "a.png", SHAPES, (20, 20), image_size=(80, 80))) == [0]
    _save(tmp_path / "a" / "0.png", _disk())
    with pytest.raises(ImageError, match="second mask for class 'circle'"):
        load_masks(tmp_path, "a.png", SHAPES, (40, 40))
    (tmp_path / "f.png").mkdir()
    (tmp_path / "f").write_text("a file where the folder should be")
    with pytest.raises(ImageError, match="expected a folder"):
        load_masks(tmp_path, "f.png", SHAPES, (40, 40))


def test_accepted_encodings(tmp_path):
    d = _disk() > 0
    _save(tmp_path / "e" / "circle.png", d.astype(np.uint8))  # 0/1
    _save(tmp_path / "e" / "square.png", d)  # 1-bit
    _save(tmp_path / "e" / "triangle.png", np.dstack([_disk()] * 3))  # grey RGB
    _save(tmp_path / "e" / "cross.png", (d * 65535).astype(np.uint16))  # 16-bit
    masks = load_masks(tmp_path, "e.png", SHAPES, (40, 40))
    assert sorted(masks) == [0, 1, 2, 3]
    for m in masks.values():
        assert np.array_equal(m, d)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_unreadable_mask(tmp_path):
    p = _save(tmp_path / "u" / "circle.png", _disk())
    p.chmod(0)
    try:
        with pytest.raises(ImageError, match="cannot be read"):
            load_masks(tmp_path, "u.png", SHAPES, (40, 40))
    finally:
        p.chmod(0o644)
