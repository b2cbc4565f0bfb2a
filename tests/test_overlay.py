"""Tests for saliaudit.report.overlay: colour maps, normalization, rendering and saving."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saliaudit.report.overlay import (
    colormap,
    map_to_png_bytes,
    normalize_map,
    render_overlay,
    save_overlay,
)


def photo(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(40, 216, size=(h, w, 3), dtype=np.uint8))


def luminance(rgb: np.ndarray) -> np.ndarray:
    c = rgb.astype(np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return lin @ np.array([0.2126, 0.7152, 0.0722])


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int64)


# --- colour maps -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["diverging", "sequential"])
def test_lut_shape_and_dtype(name: str) -> None:
    lut = colormap(name)
    assert lut.shape == (256, 3)
    assert lut.dtype == np.uint8


def test_colormap_returns_a_copy() -> None:
    lut = colormap("diverging")
    lut[:] = 0
    assert colormap("diverging")[128].tolist() == [255, 255, 255]


def test_unknown_colormap() -> None:
    with pytest.raises(ValueError):
        colormap("jet")


def test_diverging_centre_white_ends_blue_red() -> None:
    lut = colormap("diverging").astype(int)
    assert lut[128].min() >= 250
    lo, hi = lut[0], lut[255]
    assert lo[2] > lo[0] + 50 and lo[2] > lo[1]  # blue end
    assert hi[0] > hi[2] + 50 and hi[0] > hi[1]  # red end
    # Lightness rises towards the centre from both ends (balanced diverging map).
    lum = luminance(lut)
    assert np.all(np.diff(lum[:129]) >= -1e-3)
    assert np.all(np.diff(lum[128:]) <= 1e-3)


def test_sequential_monotonic_luminance() -> None:
    lut = colormap("sequential")
    lum = luminance(lut)
    assert np.all(np.diff(lum) >= -1e-3)
    assert lum[-1] - lum[0] > 0.5
    assert lut[0].tolist() == [68, 1, 84]  # viridis #440154
    assert lut[255].tolist() == [253, 231, 37]  # viridis #fde725


# --- normalization -----------------------------------------------------------------------


def test_normalize_signed_symmetric_and_bounded() -> None:
    s = np.random.default_rng(1).normal(size=(32, 32))
    n = normalize_map(s, signed=True)
    assert n.min() >= -1 and n.max() <= 1
    np.testing.assert_allclose(normalize_map(-s, signed=True), -n)
    assert np.sign(n[s != 0]).tolist() == np.sign(s[s != 0]).tolist()
    # Robust scale: a single outlier does not squash the rest of the map.
    s2 = s.copy()
    s2[0, 0] = 1e6
    assert np.abs(normalize_map(s2, signed=True)[1:, 1:]).max() > 0.5


def test_normalize_signed_uses_percentile_of_abs() -> None:
    s = np.linspace(-1, 2, 101)
    n = normalize_map(s, signed=True, percentile=100)
    np.testing.assert_allclose(n, s / 2)


def test_normalize_magnitude_range_and_negatives() -> None:
    s = np.array([[-3.0, 0.0], [1.0, 2.0]])
    n = normalize_map(s, signed=False, percentile=100)
    np.testing.assert_allclose(n, [[0.0, 0.0], [0.5, 1.0]])
    big = np.random.default_rng(2).random((20, 20)) * 7 + 1
    m = normalize_map(big, signed=False)
    assert m.min() == 0.0 and m.max() == 1.0


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
def test_normalize_constant_maps_are_zero(signed: bool, value: float) -> None:
    n = normalize_map(np.full((8, 9), value), signed=signed)
    assert n.shape == (8, 9)
    assert not np.isnan(n).any()
    assert np.all(n == 0)


@pytest.mark.parametrize("signed", [True, False])
def test_normalize_nan_inf_treated_as_zero(signed: bool) -> None:
    s = np.array([[np.nan, 1.0], [np.inf, -np.inf]])
    n = normalize_map(s, signed=signed, percentile=100)
    assert np.isfinite(n).all()
    np.testing.assert_allclose(n, [[0.0, 1.0], [0.0, 0.0]])
    assert np.all(normalize_map(np.full((3, 3), np.nan), signed=signed) == 0)


def test_normalize_sparse_map_falls_back_to_max() -> None:
    s = np.zeros((50, 50))
    s[0, 0] = 4.0  # percentile of |s| is 0 -> fall back to the max
    n = normalize_map(s, signed=True)
    assert n[0, 0] == 1.0 and np.count_nonzero(n) == 1


def test_normalize_does_not_modify_input() -> None:
    s = np.array([[np.nan, -1.0], [2.0, 3.0]], dtype=np.float32)
    before = s.copy()
    normalize_map(s, signed=True)
    normalize_map(s, signed=False)
    np.testing.assert_array_equal(s, before)


# --- rendering ---------------------------------------------------------------------------


def blob_map(h: int = 30, w: int = 40, sign: float = 1.0) -> np.ndarray:
    s = np.zeros((h, w))
    s[5:15, 5:20] = sign
    return s


def test_render_size_without_extras_equals_image() -> None:
    img = photo()
    out = render_overlay(img, blob_map(), signed=True, colorbar=False)
    assert out.mode == "RGB" and out.size == img.size


def test_render_colorbar_and_title_extend_canvas() -> None:
    img = photo()
    plain = render_overlay(img, blob_map(), signed=True, colorbar=False)
    bar = render_overlay(img, blob_map(), signed=True)
    assert bar.height == img.height
    assert bar.width >= img.width + 12
    np.testing.assert_array_equal(px(bar)[:, : img.width], px(plain))
    titled = render_overlay(img, blob_map(), signed=True, title="FullGrad / abs")
    assert titled.width == bar.width and titled.height > img.height
    band = titled.height - img.height
    np.testing.assert_array_equal(px(titled)[band:], px(bar))
    assert (px(titled)[:band] < 128).any()  # some title text drawn


def test_render_colorbar_has_diverging_and_sequential_colours() -> None:
    img = photo(40, 60)
    signed = px(render_overlay(img, blob_map(60, 40), signed=True))[:, 40:]
    red, blue = np.array([103, 0, 31]), np.array([5, 48, 97])
    assert (np.abs(signed - red).sum(-1) < 20).any() and (np.abs(signed - blue).sum(-1) < 20).any()
    mag = px(render_overlay(img, blob_map(60, 40), signed=False))[:, 40:]
    yellow, purple = np.array([253, 231, 37]), np.array([68, 1, 84])
    assert (np.abs(mag - yellow).sum(-1) < 20).any() and (np.abs(mag - purple).sum(-1) < 20).any()


def test_signed_zero_keeps_photo_and_blobs_are_coloured() -> None:
    s = np.zeros((30, 40))
    s[2:12, 2:14] = 1.0
    s[18:28, 24:38] = -1.0
    img = photo()
    out, base = px(render_overlay(img, s, signed=True, alpha=0.8, colorbar=False)), px(img)
    # Far from both blobs (beyond bilinear spill) the photo is unchanged.
    np.testing.assert_array_equal(out[20:, :15], base[20:, :15])
    np.testing.assert_array_equal(out[:10, 20:], base[:10, 20:])
    grey = Image.new("RGB", (40, 30), (128, 128, 128))
    out = px(render_overlay(grey, s, signed=True, alpha=0.8, colorbar=False))
    pos, neg = out[4:10, 4:12].reshape(-1, 3), out[20:26, 26:36].reshape(-1, 3)
    assert np.all(pos[:, 0] > pos[:, 2] + 30) and np.all(pos[:, 0] > pos[:, 1] + 30)  # red-ish
    assert np.all(neg[:, 2] > neg[:, 0] + 30)  # blue-ish
    assert np.all(out[0, 20:] == 128) and np.all(out[29, :15] == 128)


def test_all_zero_signed_map_leaves_photo_unchanged() -> None:
    img = photo()
    out = render_overlay(img, np.zeros((7, 5)), signed=True, colorbar=False)
    np.testing.assert_array_equal(px(out), px(img))


def test_magnitude_map_uses_sequential_lut() -> None:
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    s = np.tile(np.linspace(0, 1, 20), (10, 1))
    out = px(render_overlay(img, s, signed=False, alpha=1.0, colorbar=False))
    seq = colormap("sequential").astype(np.int64)
    assert np.abs(out[:, 0] - seq[0]).max() <= 1
    assert np.abs(out[:, -1] - seq[255]).max() <= 1
    # alpha=1 with w=1 everywhere: every pixel is a sequential LUT entry.
    dist = np.abs(out.reshape(-1, 1, 3) - seq[None]).sum(-1).min(1)
    assert dist.max() <= 3
    half = px(render_overlay(img, s, signed=False, alpha=0.5, colorbar=False))
    assert np.abs(half[:, -1] - np.round(seq[255] / 2)).max() <= 1


def test_saliency_resized_to_image_and_other_modes() -> None:
    img = photo(64, 48).convert("RGBA")
    s = np.zeros((7, 7))
    s[:3, :3] = 1.0
    out = render_overlay(img, s, signed=True, colorbar=False)
    assert out.size == (64, 48) and out.mode == "RGB"
    gray = Image.new("L", (16, 16), 100)
    assert render_overlay(gray, np.ones((1, 16, 16)), signed=False).height == 16


def test_render_handles_nan_inf() -> None:
    img = photo()
    s = blob_map()
    s[0, :] = np.nan
    s[1, :] = np.inf
    s[2, :] = -np.inf
    for signed in (True, False):
        out = render_overlay(img, s, signed=signed, title="nan")
        assert out.mode == "RGB"
    nan_only = np.full((30, 40), np.nan)
    out = render_overlay(img, nan_only, signed=True, colorbar=False)
    np.testing.assert_array_equal(px(out), px(img))


def test_render_does_not_modify_inputs() -> None:
    img = photo()
    img_before = img.copy()
    s = blob_map()
    s[0, 0] = np.nan
    s_before = s.copy()
    out = render_overlay(img, s, signed=True, title="t")
    assert out is not img
    np.testing.assert_array_equal(px(img), px(img_before))
    np.testing.assert_array_equal(s, s_before)


def test_render_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        render_overlay(photo(), blob_map(), signed=True, alpha=1.5)
    with pytest.raises(ValueError):
        render_overlay(photo(), np.zeros((3, 4, 5)), signed=True)


# --- saving / bytes ----------------------------------------------------------------------


def test_save_overlay_writes_png_atomically(tmp_path) -> None:
    target = tmp_path / "sub" / "overlay.png"
    img = photo()
    result = save_overlay(target, img, blob_map(), signed=True, alpha=0.6, title="x")
    assert result == target and target.exists()
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(target) as reopened:
        reopened.load()
        assert reopened.format == "PNG"
        expected = render_overlay(img, blob_map(), signed=True, alpha=0.6, title="x")
        np.testing.assert_array_equal(px(reopened), px(expected))
    # Overwrite in place; no temp files left behind.
    save_overlay(target, img, -blob_map(), signed=False)
    assert sorted(p.name for p in target.parent.iterdir()) == ["overlay.png"]


def test_save_overlay_jpeg_is_deterministic_close_and_smaller(tmp_path) -> None:
    """The audit's maps/ overlays are JPEG (quality 90, no chroma subsampling): the same bytes
    on every run, within a few grey levels of the PNG, and several times smaller on a
    photograph."""
    skimage_data = pytest.importorskip("skimage.data")
    noisy = Image.fromarray(skimage_data.astronaut()).resize((224, 224), Image.BILINEAR)
    sal = np.outer(np.hanning(224), np.hanning(224))
    jpg, png = tmp_path / "o.jpg", tmp_path / "o.png"
    save_overlay(jpg, noisy, sal, signed=False, title="t")
    first = jpg.read_bytes()
    save_overlay(jpg, noisy, sal, signed=False, title="t")
    assert jpg.read_bytes() == first and first[:3] == b"\xff\xd8\xff"
    save_overlay(png, noisy, sal, signed=False, title="t")
    with Image.open(jpg) as a, Image.open(png) as b:
        assert a.format == "JPEG" and a.size == b.size
        diff = np.abs(px(a).astype(int) - px(b).astype(int))
    assert diff.mean() < 8, diff.mean()
    assert png.stat().st_size > 3 * jpg.stat().st_size, (png.stat().st_size, jpg.stat().st_size)


def test_save_overlay_failure_leaves_no_temp(tmp_path) -> None:
    with pytest.raises(ValueError):
        save_overlay(tmp_path / "bad.png", photo(), blob_map(), signed=True, alpha=-1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signed", [True, False])
def test_map_to_png_bytes(signed: bool) -> None:
    data = map_to_png_bytes(blob_map(), signed=signed)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (40, 30) and im.mode == "RGB"
    with Image.open(io.BytesIO(map_to_png_bytes(blob_map(), signed=signed, size=(16, 8)))) as im:
        assert im.size == (16, 8)
    nan = np.full((4, 4), np.nan)
    with Image.open(io.BytesIO(map_to_png_bytes(nan, signed=signed))) as im:
        centre = colormap("diverging")[128] if signed else colormap("sequential")[0]
        assert np.all(px(im) == centre)


def test_no_matplotlib_import() -> None:
    # Static check (a subprocess import would pay for torch via the package __init__).
    import ast

    import saliaudit.report.overlay as overlay

    tree = ast.parse(Path(overlay.__file__).read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names and not any(name.split(".")[0] == "matplotlib" for name in names)
