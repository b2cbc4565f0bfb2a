"""Tests for saliaudit.data: discovery of image files and robust decoding."""

from __future__ import annotations

import io
import os
import struct
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from saliaudit import data
from saliaudit.data import (
    IMAGE_EXTENSIONS,
    DecodedImage,
    ImageEntry,
    Skipped,
    decode_image,
    find_images,
    iter_decoded,
    require_images,
)
from saliaudit.errors import EXIT_NO_IMAGES, ImageError, NoImagesError, UsageError


def rgb_image(w: int = 16, h: int = 12, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def entry(path: Path) -> ImageEntry:
    return ImageEntry(path, path.name)


def decode_error(path: Path, **kw) -> str:
    with pytest.raises(ImageError) as info:
        decode_image(entry(path), **kw)
    text = str(info.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- discovery


def test_extensions():
    assert {
        ".png",
        ".jpg",
        ".jpeg",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
    } == IMAGE_EXTENSIONS


def test_folder_walk_sorted_recursive_and_filters(tmp_path):
    for rel in ["b.png", "a.JPG", "sub/c.png", "sub/deeper/d.bmp", ".hidden.png", ".git/e.png"]:
        save(rgb_image(), tmp_path / rel, "PNG")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "noext").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a directory named like an image is not a candidate
    listing = find_images(tmp_path)
    assert [e.rel for e in listing.entries] == ["a.JPG", "b.png", "sub/c.png", "sub/deeper/d.bmp"]
    assert all(e.path.is_absolute() and e.path.is_file() for e in listing.entries)
    assert all(e.label is None for e in listing.entries)
    assert listing.class_names is None
    assert listing.found == 4 and listing.skipped == []
    assert listing.root == tmp_path


def test_imagefolder_labels(tmp_path):
    for rel in ["dog/1.png", "cat/2.png", "cat/1.png", "bird/x.jpg"]:
        save(rgb_image(), tmp_path / rel, "PNG")
    listing = find_images(tmp_path)
    assert listing.class_names == ["bird", "cat", "dog"]
    assert [(e.rel, e.label) for e in listing.entries] == [
        ("bird/x.jpg", 0),
        ("cat/1.png", 1),
        ("cat/2.png", 1),
        ("dog/1.png", 2),
    ]


def test_not_imagefolder_when_mixed_depth_or_single_class(tmp_path):
    save(rgb_image(), tmp_path / "a" / "1.png")
    save(rgb_image(), tmp_path / "top.png")
    assert find_images(tmp_path).class_names is None
    one = tmp_path / "one"
    save(rgb_image(), one / "only" / "1.png")
    listing = find_images(one)
    assert listing.class_names is None and listing.entries[0].label is None


def test_symlink_loop_is_safe(tmp_path):
    save(rgb_image(), tmp_path / "a" / "x.png")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    os.symlink(tmp_path / "missing.png", tmp_path / "broken.png")
    listing = find_images(tmp_path)
    assert [e.rel for e in listing.entries] == ["a/x.png"]
    assert listing.skipped == [Skipped("broken.png", listing.skipped[0].reason)]
    assert "broken symbolic link" in listing.skipped[0].reason


def test_unlistable_folder_is_skipped_monkeypatched(tmp_path, monkeypatch):
    save(rgb_image(), tmp_path / "ok" / "x.png")
    save(rgb_image(), tmp_path / "locked" / "y.png")
    real = os.scandir

    def fake(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(data.os, "scandir", fake)
    listing = find_images(tmp_path)
    assert [e.rel for e in listing.entries] == ["ok/x.png"]
    assert listing.skipped[0].path == "locked"
    assert "permission denied" in listing.skipped[0].reason
    assert listing.found == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_unlistable_folder_is_skipped_chmod(tmp_path):
    save(rgb_image(), tmp_path / "ok" / "x.png")
    locked = tmp_path / "locked"
    save(rgb_image(), locked / "y.png")
    locked.chmod(0)
    try:
        listing = find_images(tmp_path)
    finally:
        locked.chmod(0o755)
    assert [e.rel for e in listing.entries] == ["ok/x.png"]
    assert "permission denied" in listing.skipped[0].reason


def test_list_file(tmp_path):
    save(rgb_image(), tmp_path / "imgs" / "a.png")
    save(rgb_image(), tmp_path / "imgs" / "b.png")
    outside = save(rgb_image(), tmp_path / "elsewhere" / "c.png")
    (tmp_path / "imgs" / "dir.png").mkdir()
    lst = tmp_path / "imgs" / "list.txt"
    lst.write_text(f"# my images\n\na.png\n  b.png  \nmissing.png\n{outside}\ndir.png\n")
    listing = find_images(lst)
    assert [e.rel for e in listing.entries] == ["a.png", "b.png", outside.as_posix()]
    assert listing.entries[0].path == tmp_path / "imgs" / "a.png"
    assert listing.class_names is None and all(e.label is None for e in listing.entries)
    reasons = {s.path: s.reason for s in listing.skipped}
    assert "file not found" in reasons["missing.png"] and "line 5" in reasons["missing.png"]
    assert "folder" in reasons["dir.png"]
    assert listing.found == 5
    assert listing.root == tmp_path / "imgs"


def test_binary_list_file_is_usage_error(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\xff\xfe\x00\x01" * 10)
    with pytest.raises(UsageError):
        find_images(bad)


def test_single_image_source(tmp_path):
    p = save(rgb_image(), tmp_path / "one.png")
    listing = find_images(p)
    assert [e.rel for e in listing.entries] == ["one.png"]


def test_sample_and_max_images(tmp_path):
    for i in range(20):
        save(rgb_image(4, 4), tmp_path / f"{i:02d}.png")
    a = find_images(tmp_path, sample=5, seed=3)
    b = find_images(tmp_path, sample=5, seed=3)
    c = find_images(tmp_path, sample=5, seed=4)
    assert [e.rel for e in a.entries] == [e.rel for e in b.entries]
    assert [e.rel for e in a.entries] != [e.rel for e in c.entries]
    assert [e.rel for e in a.entries] == sorted(e.rel for e in a.entries)
    assert a.found == 20
    capped = find_images(tmp_path, sample=5, seed=3, max_images=2)
    assert [e.rel for e in capped.entries] == [e.rel for e in a.entries][:2]
    assert [e.rel for e in find_images(tmp_path, max_images=3).entries] == ["00.png", "01.png", "02.png"]
    assert len(find_images(tmp_path, sample=100).entries) == 20
    with pytest.raises(UsageError):
        find_images(tmp_path, max_images=0)


def test_empty_folder_require_images(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing")
    listing = find_images(tmp_path)
    assert listing.entries == [] and listing.found == 0
    with pytest.raises(NoImagesError) as info:
        require_images(listing)
    assert str(tmp_path) in str(info.value)
    assert "put .png/.jpg files in it" in str(info.value)
    assert info.value.exit_code == EXIT_NO_IMAGES
    save(rgb_image(), tmp_path / "x.png")
    require_images(find_images(tmp_path))  # no error


def test_missing_source_is_usage_error(tmp_path):
    with pytest.raises(UsageError) as info:
        find_images(tmp_path / "nope")
    assert "nope" in str(info.value)


# --------------------------------------------------------------------------- decoding


def test_decode_rgb_png(tmp_path):
    img = rgb_image(16, 12)
    p = save(img, tmp_path / "a.png")
    d = decode_image(entry(p))
    assert isinstance(d, DecodedImage)
    assert d.image.mode == "RGB" and d.image.size == (16, 12) and d.original_size == (16, 12)
    assert d.original_mode == "RGB" and d.notes == []
    assert np.array_equal(np.asarray(d.image), np.asarray(img))
    import hashlib

    assert d.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


def test_text_file_named_png(tmp_path):
    p = tmp_path / "x.png"
    p.write_text("hello, I am not a picture\n")
    msg = decode_error(p)
    assert "not an image" in msg and "text" in msg and "remove it or fix the file" in msg


def test_binary_garbage(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(bytes(range(256)) * 4)
    assert "not an image" in decode_error(p)


def test_empty_file(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"")
    assert "empty file" in decode_error(p)


@pytest.mark.parametrize(
    "fmt,name", [("PNG", "t.png"), ("JPEG", "t.jpg"), ("GIF", "t.gif"), ("TIFF", "t.tif")]
)
def test_truncated(tmp_path, fmt, name):
    buf = io.BytesIO()
    rgb_image(64, 64).save(buf, fmt)
    p = tmp_path / name
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    assert "truncated or corrupt" in decode_error(p)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_load_truncated_flag_set_elsewhere_is_noted(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    d = decode_image(entry(save(rgb_image(), tmp_path / "a.png")))
    assert any("LOAD_TRUNCATED_IMAGES" in n for n in d.notes)


def test_16bit_png_scaling(tmp_path):
    arr = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    p = save(Image.fromarray(arr), tmp_path / "g16.png")
    d = decode_image(entry(p))
    assert d.original_mode.startswith("I")
    out = np.asarray(d.image)
    assert d.image.mode == "RGB" and out.shape == (1, 4, 3)
    assert list(out[0, :, 0]) == [0, 100, 255, 4]
    assert "16-bit image scaled to 8 bits" in d.notes


def test_16bit_big_endian_and_int32(tmp_path):
    arr = np.array([[0, 65535]], dtype=">u2")
    p = save(Image.frombytes("I;16B", (2, 1), arr.tobytes()), tmp_path / "be.tif")
    d = decode_image(entry(p))
    assert list(np.asarray(d.image)[0, :, 0]) == [0, 255]
    p = save(Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I"), tmp_path / "i32.tif")
    d = decode_image(entry(p))
    assert d.original_mode == "I" and list(np.asarray(d.image)[0, :, 0]) == [0, 255]


def test_float_image(tmp_path):
    p = save(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F"), tmp_path / "f.tif")
    d = decode_image(entry(p))
    assert d.original_mode == "F"
    assert list(np.asarray(d.image)[0, :, 0]) == [0, 128, 255]
    assert any("float" in n for n in d.notes)
    p = save(Image.fromarray(np.array([[-10.0, 0.0, 10.0]], dtype=np.float32), "F"), tmp_path / "g.tif")
    assert list(np.asarray(decode_image(entry(p)).image)[0, :, 0]) == [0, 128, 255]


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGB"])
def test_plain_modes_to_rgb(tmp_path, mode):
    img = rgb_image(10, 8).convert(mode)
    d = decode_image(entry(save(img, tmp_path / "m.png")))
    assert d.original_mode == mode and d.image.mode == "RGB" and d.image.size == (10, 8)
    assert not any("alpha" in n for n in d.notes)


def test_rgba_composited_on_black(tmp_path):
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[..., :3] = 200
    arr[..., 3] = [[255, 0], [128, 255]]
    d = decode_image(entry(save(Image.fromarray(arr, "RGBA"), tmp_path / "a.png")))
    out = np.asarray(d.image)[..., 0]
    assert d.original_mode == "RGBA" and d.image.mode == "RGB"
    assert out[0, 0] == 200 and out[0, 1] == 0 and abs(int(out[1, 0]) - 100) <= 1
    assert "alpha composited on black" in d.notes


def test_la_and_opaque_alpha(tmp_path):
    la = Image.fromarray(np.dstack([np.full((2, 2), 90, np.uint8), np.zeros((2, 2), np.uint8)]), "LA")
    d = decode_image(entry(save(la, tmp_path / "la.png")))
    assert d.original_mode == "LA" and np.asarray(d.image).max() == 0
    opaque = rgb_image(4, 4).convert("RGBA")
    d = decode_image(entry(save(opaque, tmp_path / "op.png")))
    assert d.image.mode == "RGB" and "alpha composited on black" not in d.notes


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 2), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((1, 0), 1)
    p = save(img, tmp_path / "p.png", transparency=0)
    d = decode_image(entry(p))
    out = np.asarray(d.image)
    assert d.original_mode == "P" and d.image.mode == "RGB"
    assert tuple(out[0, 0]) == (0, 0, 0)  # transparent red -> black
    assert tuple(out[0, 1]) == (0, 255, 0)
    assert "alpha composited on black" in d.notes


def test_cmyk_jpeg(tmp_path):
    p = save(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)
    d = decode_image(entry(p))
    assert d.original_mode == "CMYK" and d.image.mode == "RGB" and d.image.size == (8, 6)
    r, g, b = np.asarray(d.image).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60  # C=0, M=Y=max -> red


def test_ycbcr_and_hsv_to_rgb(tmp_path):
    d = decode_image(entry(save(rgb_image().convert("YCbCr"), tmp_path / "y.tif")))
    assert d.image.mode == "RGB"
    notes: list[str] = []
    out = data._to_rgb(Image.new("HSV", (2, 2), (0, 255, 255)), notes, ImageEntry(tmp_path, "x"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_rotates(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    img.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    p = save(img, tmp_path / "o.png", exif=exif)
    d = decode_image(entry(p))
    assert d.image.size == (10, 20) and d.original_size == (10, 20)
    assert "EXIF orientation 6 applied" in d.notes
    assert d.image.getpixel((9, 0)) == (255, 0, 0)  # 90° clockwise: top-left -> top-right


def test_exif_orientation_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    d = decode_image(entry(save(Image.new("RGB", (20, 10)), tmp_path / "o.jpg", exif=exif)))
    assert d.image.size == (10, 20) and "EXIF orientation 8 applied" in d.notes


def test_decompression_bomb_by_max_pixels(tmp_path):
    p = save(Image.new("L", (3000, 3000)), tmp_path / "big.png")
    msg = decode_error(p, max_pixels=1_000_000)
    assert "image too large" in msg and "3000×3000" in msg and "9000000" in msg and "--max-pixels" in msg
    assert decode_image(entry(p), max_pixels=10_000_000).image.size == (3000, 3000)


def test_pil_bomb_limit(tmp_path, monkeypatch):
    p = save(Image.new("L", (100, 100)), tmp_path / "b.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 > 2 * limit: PIL refuses
    assert "image too large" in decode_error(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # warning only; our own limit decides
    assert decode_image(entry(p)).image.size == (100, 100)
    assert "image too large" in decode_error(p, max_pixels=5000)


def test_wrong_extension(tmp_path):
    p = save(rgb_image(), tmp_path / "really_png.jpg", "PNG")
    d = decode_image(entry(p))
    assert "extension .jpg but content is PNG" in d.notes
    q = save(rgb_image(), tmp_path / "really_jpeg.png", "JPEG")
    assert "extension .png but content is JPEG" in decode_image(entry(q)).notes
    r = save(rgb_image(), tmp_path / "fine.jpeg", "JPEG")
    assert decode_image(entry(r)).notes == []


def test_permission_denied_monkeypatched(tmp_path, monkeypatch):
    p = save(rgb_image(), tmp_path / "locked.png")
    real = data._read_bytes

    def fake(path):
        if Path(path) == p:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(data, "_read_bytes", fake)
    assert "permission denied" in decode_error(p)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_permission_denied_chmod(tmp_path):
    p = save(rgb_image(), tmp_path / "locked.png")
    p.chmod(0)
    try:
        assert "permission denied" in decode_error(p)
    finally:
        p.chmod(0o644)


def test_directory_and_missing_file(tmp_path):
    d = tmp_path / "x.png"
    d.mkdir()
    assert "folder" in decode_error(d)
    assert "not found" in decode_error(tmp_path / "gone.png")


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 4), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50)
    d = decode_image(entry(p))
    assert d.image.size == (6, 4) and d.image.getpixel((0, 0)) == (255, 0, 0)
    assert any("3 frames" in n and "first frame" in n for n in d.notes)


def test_multiframe_tiff(tmp_path):
    p = tmp_path / "pages.tiff"
    Image.new("L", (5, 5), 10).save(p, save_all=True, append_images=[Image.new("L", (5, 5), 200)])
    d = decode_image(entry(p))
    assert d.image.getpixel((0, 0)) == (10, 10, 10)
    assert any("multi-frame" in n for n in d.notes)


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def test_zero_sized_png_is_rejected(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 0, 5, 8, 0, 0, 0, 0)
    blob = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )
    p = tmp_path / "zero.png"
    p.write_bytes(blob)
    decode_error(p)


def test_corrupted_bytes_never_raise_other_errors(tmp_path):
    rng = np.random.default_rng(1)
    for fmt, ext in [
        ("PNG", ".png"),
        ("JPEG", ".jpg"),
        ("GIF", ".gif"),
        ("TIFF", ".tif"),
        ("BMP", ".bmp"),
        ("WEBP", ".webp"),
        ("PPM", ".ppm"),
    ]:
        buf = io.BytesIO()
        rgb_image(24, 24).save(buf, fmt)
        good = buf.getvalue()
        for i in range(12):
            blob = bytearray(good)
            for pos in rng.integers(0, len(blob), size=4):
                blob[pos] = int(rng.integers(0, 256))
            p = tmp_path / f"fuzz{i}{ext}"
            p.write_bytes(bytes(blob))
            try:
                d = decode_image(entry(p), max_pixels=1_000_000)
            except ImageError as err:
                assert "\n" not in str(err)
            else:
                assert d.image.mode == "RGB"


# --------------------------------------------------------------------------- streaming


def test_iter_decoded_order_skips_and_duplicates(tmp_path):
    save(rgb_image(seed=1), tmp_path / "a.png")
    (tmp_path / "b.png").write_text("not an image")
    (tmp_path / "c.png").write_bytes((tmp_path / "a.png").read_bytes())
    save(rgb_image(seed=2), tmp_path / "d.jpg")
    save(Image.new("L", (3000, 3000)), tmp_path / "e.png")
    listing = find_images(tmp_path)
    it = iter_decoded(listing, max_pixels=1_000_000)
    assert isinstance(it, types.GeneratorType)
    items = list(it)
    assert [type(x).__name__ for x in items] == [
        "DecodedImage",
        "Skipped",
        "Skipped",
        "DecodedImage",
        "Skipped",
    ]
    assert items[1] == Skipped("b.png", items[1].reason) and "not an image" in items[1].reason
    assert not items[1].reason.startswith("b.png")
    assert "duplicate of a.png" in items[2].reason
    assert "image too large" in items[4].reason


def test_iter_decoded_is_lazy(tmp_path, monkeypatch):
    for i in range(3):
        save(rgb_image(seed=i), tmp_path / f"{i}.png")
    calls: list[str] = []
    real = data.decode_image

    def counting(e, **kw):
        calls.append(e.rel)
        return real(e, **kw)

    monkeypatch.setattr(data, "decode_image", counting)
    it = iter_decoded(find_images(tmp_path))
    assert calls == []
    first = next(it)
    assert isinstance(first, DecodedImage) and calls == ["0.png"]
    assert len(list(it)) == 2 and len(calls) == 3


def test_saliaudit_output_folders_inside_the_image_folder_are_skipped(tmp_path):
    # `-o` inside the image folder: a second run must not audit its own overlays
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    out = tmp_path / "report" / "maps"
    out.mkdir(parents=True)
    Image.new("RGB", (8, 8), "blue").save(out / "a.fullgrad.paper.png")
    (tmp_path / "report" / ".saliaudit-output").write_text("x")
    assert [e.rel for e in find_images(tmp_path).entries] == ["a.png"]
    (tmp_path / "report" / ".saliaudit-output").unlink()
    assert len(find_images(tmp_path).entries) == 2
