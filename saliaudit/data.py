"""Finding and decoding the images to audit (see docs/usage.md, "Images").

``find_images`` lists a folder (recursively) or a list file; ``decode_image`` turns one file
into an 8-bit RGB ``PIL.Image`` or raises ``ImageError`` with a one-line reason;
``iter_decoded`` streams a listing, turning every bad file into a ``Skipped`` record.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from saliaudit.errors import ImageError, NoImagesError, UsageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(".png .jpg .jpeg .bmp .gif .tif .tiff .webp .ppm .pgm".split())

# Formats PIL may try. A fixed allow-list keeps untrusted files away from plugins that run
# external programs (EPS calls Ghostscript) or are rarely exercised.
_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # JPEG covers MPO
_FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg"),
    "BMP": (".bmp",),
    "GIF": (".gif",),
    "TIFF": (".tif", ".tiff"),
    "WEBP": (".webp",),
    "PPM": (".ppm", ".pgm"),
}
_ORIENTATION_TAG = 0x0112
_OUTPUT_MARKER = ".saliaudit-output"  # written by saliaudit.report.output into its folders
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@dataclass(frozen=True)
class Skipped:
    """A file (or folder) left out of the audit, with the reason."""

    path: str
    reason: str


@dataclass(frozen=True)
class ImageEntry:
    """One candidate image file."""

    path: Path
    rel: str
    label: int | None = None


@dataclass
class ImageListing:
    """The result of ``find_images``."""

    root: Path
    entries: list[ImageEntry]
    skipped: list[Skipped]
    class_names: list[str] | None
    found: int
    source: Path | None = None  # the folder or list file as given (absolute)


@dataclass
class DecodedImage:
    """An image decoded to 8-bit RGB, with what was done to get there."""

    entry: ImageEntry
    image: Image.Image
    sha256: str
    original_mode: str
    original_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- discovery


def find_images(
    source: str | Path, *, max_images: int | None = None, sample: int | None = None, seed: int = 0
) -> ImageListing:
    """List the candidate images of a folder, a list file or a single image file."""
    for name, value in (("max_images", max_images), ("sample", sample)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    src = Path(os.path.abspath(os.path.expanduser(str(source))))
    if not src.exists():
        hint = "broken symbolic link" if src.is_symlink() else "check the path"
        raise UsageError("image source does not exist", path=source, hint=hint)
    if src.is_dir():
        listing = _walk_folder(src)
    elif src.suffix.lower() in IMAGE_EXTENSIONS:
        listing = ImageListing(src.parent, [ImageEntry(src, src.name)], [], None, 1)
    else:
        listing = _read_list_file(src)
    listing.source = src
    if sample is not None and sample < len(listing.entries):  # reproducible subset, sorted order kept
        picked = sorted(random.Random(seed).sample(range(len(listing.entries)), sample))
        listing.entries = [listing.entries[i] for i in picked]
    listing.entries = listing.entries[:max_images]
    return listing


def require_images(listing: ImageListing) -> None:
    """Raise ``NoImagesError`` when the listing has no entries."""
    if listing.entries:
        return
    where = listing.source or listing.root
    what, hint = (
        (
            "no image files found",
            "put .png/.jpg files in it; also read: " + " ".join(sorted(IMAGE_EXTENSIONS)),
        )
        if where.is_dir()
        else ("the list file names no image", "one image path a line")
    )
    if listing.skipped:
        what += (
            f" ({len(listing.skipped)} skipped, e.g. {listing.skipped[0].path}: {listing.skipped[0].reason})"
        )
    raise NoImagesError(what, path=where, hint=hint)


def _walk_folder(root: Path) -> ImageListing:
    """Walk ``root`` in sorted order; directory symlinks are followed once (loop-safe)."""
    entries: list[tuple[tuple[str, ...], ImageEntry]] = []
    skipped: list[Skipped] = []
    visited: set[str] = {os.path.realpath(root)}
    top_dirs: list[str] = []
    stack: list[tuple[Path, tuple[str, ...]]] = [(root, ())]
    while stack:
        folder, parts = stack.pop()
        try:
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            why = (
                "permission denied: cannot list this folder; give read and execute permission (chmod +rx)"
                if isinstance(exc, PermissionError)
                else f"cannot list this folder ({exc.strerror or exc})"
            )
            skipped.append(Skipped("/".join(parts) or ".", f"{why} or remove it"))
            continue
        subdirs: list[tuple[Path, tuple[str, ...]]] = []
        for child in children:
            if child.name.startswith("."):
                continue
            cparts, rel = parts + (child.name,), "/".join(parts + (child.name,))
            if _safe(child.is_dir):
                real = os.path.realpath(child.path)
                if real in visited or _safe(
                    lambda child=child: os.path.exists(os.path.join(child.path, _OUTPUT_MARKER))
                ):
                    continue  # loops, and saliaudit's own output folders (their overlays)
                visited.add(real)
                if not parts:
                    top_dirs.append(child.name)
                subdirs.append((Path(child.path), cparts))
                continue
            if os.path.splitext(child.name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            if not _safe(child.is_file):
                broken = child.is_symlink() and not os.path.exists(child.path)
                skipped.append(
                    Skipped(
                        rel,
                        "broken symbolic link; fix its target or remove it"
                        if broken
                        else "not a regular file (pipe, socket or device); remove it",
                    )
                )
                continue
            entries.append((cparts, ImageEntry(Path(child.path), rel)))
        stack.extend(reversed(subdirs))
    entries.sort(key=lambda pe: pe[0])
    class_names: list[str] | None = None
    # ImageFolder layout: every image one level below a class folder, at least two classes.
    if len({p[0] for p, _ in entries}) >= 2 and all(len(p) == 2 for p, _ in entries):
        class_names = sorted(top_dirs)
        index = {name: i for i, name in enumerate(class_names)}
        ordered = [ImageEntry(e.path, e.rel, index[p[0]]) for p, e in entries]
    else:
        ordered = [e for _, e in entries]
    return ImageListing(root, ordered, skipped, class_names, len(ordered) + len(skipped))


def _read_list_file(list_file: Path) -> ImageListing:
    """Read a text file with one image path per line (``#`` comments and blank lines ignored)."""
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UsageError(
            f"cannot read the list file ({exc.strerror or exc})",
            path=list_file,
            hint="give read permission or pass another source",
        ) from None
    except UnicodeDecodeError:
        text = "\x00"
    if "\x00" in text:
        raise UsageError(
            "not a folder, an image or a UTF-8 text list of image paths",
            path=list_file,
            hint="pass a folder of images or a text file with one image path per line",
        )
    base = list_file.parent
    entries: list[ImageEntry] = []
    skipped: list[Skipped] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        full = Path(os.path.normpath(os.path.join(base, os.path.expanduser(line))))
        try:
            rel = full.relative_to(base).as_posix()
        except ValueError:
            rel = full.as_posix()
        where = f"listed in {list_file.name} line {lineno}"
        if full.is_dir():
            skipped.append(
                Skipped(rel, f"is a folder, not an image file ({where}); list image files instead")
            )
        elif not full.exists():
            skipped.append(Skipped(rel, f"file not found ({where}); fix the path or remove the line"))
        else:
            entries.append(ImageEntry(full, rel))
    return ImageListing(base, entries, skipped, None, len(entries) + len(skipped))


def _safe(test: Callable[[], bool]) -> bool:
    """Run a ``DirEntry`` test, treating an OSError as False."""
    try:
        return test()
    except OSError:
        return False


# --------------------------------------------------------------------------- decoding


def _read_bytes(path: Path) -> bytes:
    """Read the whole file (a separate function so tests can simulate I/O errors)."""
    with open(path, "rb") as fh:
        return fh.read()


def decode_image(entry: ImageEntry, *, max_pixels: int = 64_000_000) -> DecodedImage:
    """Decode one file to 8-bit RGB; raise ``ImageError`` with a one-line reason."""
    if max_pixels < 1:
        raise UsageError(f"max_pixels must be at least 1, got {max_pixels}")
    try:
        return _decode(entry, max_pixels)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError("not enough memory to decode this image; downscale it", path=entry.rel) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large ({_describe(exc)}); downscale it", path=entry.rel) from None
    except Exception as exc:  # any plugin failure on untrusted bytes (OSError, SyntaxError, struct.error...)
        raise ImageError(
            f"truncated or corrupt image ({_describe(exc)}); re-export or re-download it", path=entry.rel
        ) from None


def _decode(entry: ImageEntry, max_pixels: int) -> DecodedImage:
    path = entry.path
    if path.is_dir():
        raise ImageError("is a folder, not an image file; remove it from the image list", path=entry.rel)
    if path.exists() and not path.is_file():
        raise ImageError("not a regular file (pipe, socket or device); remove it", path=entry.rel)
    data = _read_file(entry, max_pixels)
    notes: list[str] = []
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # global owned by the user's environment: report, never change
        notes.append(
            "truncated images are not detected: PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set "
            "to True by another library"
        )
    pil_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # PIL's bomb warning is an error, unless the user raised our limit above PIL's on purpose.
        bomb_action = "error" if pil_limit is not None and max_pixels <= pil_limit else "ignore"
        warnings.simplefilter(bomb_action, Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=_FORMATS)
        except UnidentifiedImageError:
            raise ImageError(
                f"not an image: {_sniff(data)}; remove it or fix the file", path=entry.rel
            ) from None
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError(
                f"image has a zero dimension ({width}×{height}); remove it or fix the file", path=entry.rel
            )
        if width * height > max_pixels:
            raise ImageError(
                f"image too large ({width}×{height} = {width * height} pixels > limit "
                f"{max_pixels}); downscale it or raise --max-pixels",
                path=entry.rel,
            )
        fmt = "JPEG" if img.format == "MPO" else (img.format or "unknown")
        ext = path.suffix.lower()
        if ext in IMAGE_EXTENSIONS and ext not in _FORMAT_EXTENSIONS.get(fmt, ()):
            notes.append(f"extension {ext} but content is {fmt}")
        frames = int(getattr(img, "n_frames", 1) or 1)
        if frames > 1:
            img.seek(0)
            kind = "animated" if fmt in ("GIF", "WEBP", "PNG") else "multi-frame"
            notes.append(f"{kind} image ({frames} frames): first frame used")
        try:
            img.load()
        except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
            raise ImageError(
                f"truncated or corrupt image ({_describe(exc)}); re-export or re-download it", path=entry.rel
            ) from None
        frame = _apply_orientation(img, notes)
        original_mode = frame.mode
        rgb = _to_rgb(frame, notes, entry)
    for message in dict.fromkeys(_describe(w.message) for w in caught):  # PIL warnings become notes
        notes.append(f"decoder warning: {message}")
    return DecodedImage(entry, rgb, hashlib.sha256(data).hexdigest(), original_mode, rgb.size, notes)


def _read_file(entry: ImageEntry, max_pixels: int) -> bytes:
    """Read the file bytes, mapping I/O problems to one-line reasons."""
    try:
        size = entry.path.stat().st_size
        # Generous bound (16 bytes per allowed pixel + 16 MiB of metadata) on what we read.
        if size > max_pixels * 16 + (16 << 20):
            raise ImageError(
                f"file too large ({size} bytes) for the pixel limit {max_pixels}; "
                "downscale it or raise --max-pixels",
                path=entry.rel,
            )
        data = _read_bytes(entry.path)
    except OSError as exc:
        reason = {
            PermissionError: "permission denied; give read permission (chmod +r) or remove it",
            FileNotFoundError: "file not found (deleted or moved after listing); check the path",
            IsADirectoryError: "is a folder, not an image file; remove it from the image list",
        }.get(type(exc), f"cannot read file ({exc.strerror or exc}); check the disk or remove it")
        raise ImageError(reason, path=entry.rel) from None
    if not data:
        raise ImageError("empty file (0 bytes); remove it or re-export the image", path=entry.rel)
    return data


def _apply_orientation(img: Image.Image, notes: list[str]) -> Image.Image:
    """Apply the EXIF orientation; return the (possibly same) image."""
    try:
        orientation = int(img.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # broken EXIF block: decode the pixels anyway
        notes.append("EXIF data unreadable: orientation not applied")
        return img
    if orientation not in range(2, 9):
        return img
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:
        notes.append(f"EXIF orientation {orientation} could not be applied")
        return img
    notes.append(f"EXIF orientation {orientation} applied")
    return out if out is not None else img


def _to_rgb(img: Image.Image, notes: list[str], entry: ImageEntry) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency on black."""
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float32)
        bad = ~np.isfinite(arr)
        if bad.any():
            notes.append("non-finite pixel values replaced by 0")
            arr = np.where(bad, np.float32(0), arr)
        lo, hi, full = float(arr.min()), float(arr.max()), 1.0 if mode == "F" else 65535.0
        kind = "32-bit float" if mode == "F" else "32-bit integer"
        if lo >= 0 and hi <= full:  # the type's usual range: [0, 1] for float, 16 bits for integers
            arr8 = np.rint(arr * (255.0 / full)).astype(np.uint8)
            notes.append(
                f"{kind} image scaled from [0, 1] to 8 bits"
                if mode == "F"
                else "16-bit image scaled to 8 bits"
            )
        else:
            scale = 255.0 / (hi - lo) if hi > lo else 0.0
            arr8 = np.rint((arr - lo) * scale).astype(np.uint8)
            notes.append(f"{kind} image min–max scaled to 8 bits (values {lo:g}..{hi:g})")
        return Image.fromarray(arr8, "L").convert("RGB")
    try:
        if mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img.convert("RGBA")
            alpha = rgba.getchannel("A")
            if alpha.getextrema()[0] < 255:
                notes.append("alpha composited on black")
                out = Image.new("RGB", rgba.size, (0, 0, 0))
                out.paste(rgba.convert("RGB"), mask=alpha)
                return out
            return rgba.convert("RGB")
        return img if mode == "RGB" else img.convert("RGB")
    except ValueError as exc:
        raise ImageError(
            f"unsupported color mode {mode} ({exc}); convert it to RGB", path=entry.rel
        ) from None


def _sniff(data: bytes) -> str:
    """Say what non-image content looks like."""
    head = data[:512]
    if b"\x00" not in head and head.decode("utf-8", "replace").count("\ufffd") <= 1:
        return "the content is text, not image data"
    return f"unrecognised content (supported: {', '.join(_FORMATS)})"


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _reason(err: ImageError) -> str:
    """The message of ``err`` without its ``path: `` prefix."""
    text, prefix = str(err), f"{err.path}: "
    return text[len(prefix) :] if err.path and text.startswith(prefix) else text


def iter_decoded(listing: ImageListing, *, max_pixels: int = 64_000_000) -> Iterator[DecodedImage | Skipped]:
    """Yield one ``DecodedImage`` or ``Skipped`` per entry, in order; duplicates are skipped."""
    seen: dict[str, str] = {}
    for entry in listing.entries:
        try:
            decoded = decode_image(entry, max_pixels=max_pixels)
        except ImageError as err:
            yield Skipped(entry.rel, _reason(err))
            continue
        first = seen.get(decoded.sha256)
        if first is not None:
            del decoded
            yield Skipped(entry.rel, f"duplicate of {first} (same file content); audited once")
            continue
        seen[decoded.sha256] = entry.rel
        yield decoded
        del decoded  # hold no image while decoding the next one
