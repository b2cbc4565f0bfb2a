"""Per-image, per-class object masks for the pointing games (``--masks DIR``).

Layout (the one the sample models ship, see ``sample_models/README.md``)::

    MASKS/<image path relative to the audited folder, without extension>/<class>.png

e.g. the image ``circle/000.png`` has ``MASKS/circle/000/circle.png``. ``<class>`` is a class
name of the model (exact, else case-insensitive) or a class index. A mask is binary (0 and
255; 0 and 1 also accepted), one channel or grey RGB, and image-sized (any resolution with the
image's aspect ratio is accepted).

Masks are brought to the model's input size exactly as :meth:`LoadedModel.preprocess` brings
the image there (bilinear, antialiased, aspect ratio not kept; for a model whose preprocessing
resizes the shorter side and center-crops, the same resize and the same crop), then
thresholded at 0.5: a
pixel belongs to the object when at least half of it is covered, so the mask stays aligned
with the resized image. (Nearest-neighbour resizing would shift the mask by up to half a
source pixel against the bilinear image; at equal size neither changes anything.) An object
thinner than half an input pixel keeps its best-covered pixels instead of vanishing.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

from .errors import ImageError

__all__ = ["load_masks", "mask_folder", "mask_skip_reason", "MASK_SUFFIXES"]

#: File suffixes read as masks; other files in a mask folder (READMEs, .DS_Store) are ignored.
MASK_SUFFIXES = frozenset({".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".jpg", ".jpeg"})

_LAYOUT = "MASKS/<image path without extension>/<class>.png"


def mask_folder(masks_dir: Path, image_rel: str) -> Path:
    """The folder holding the masks of ``image_rel`` (a path relative to the image folder)."""
    rel = PurePosixPath(str(image_rel).replace("\\", "/"))
    return Path(masks_dir).joinpath(*rel.with_suffix("").parts)


def _mask_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in MASK_SUFFIXES and p.is_file()
    )


def mask_skip_reason(masks_dir: Path, image_rel: str) -> str | None:
    """Why ``image_rel`` has no masks (``None`` when its mask folder holds mask files).

    For the audit's per-image record; an unusable mask file is reported by
    :func:`load_masks` (it raises :class:`~saliaudit.errors.ImageError`).
    """
    folder = mask_folder(masks_dir, image_rel)
    if not folder.exists():
        return f"no mask folder {folder}"
    if not folder.is_dir():
        return f"{folder} is not a folder (expected {_LAYOUT})"
    try:
        files = _mask_files(folder)
    except OSError as err:
        return f"cannot list {folder}: {err.strerror or err}"
    if not files:
        return f"no mask file in {folder} (expected <class>.png)"
    return None


def _class_index(stem: str, class_names: list[str], path: Path) -> int:
    if stem in class_names:
        return class_names.index(stem)
    lower = [c.lower() for c in class_names]
    if lower.count(stem.lower()) == 1:
        return lower.index(stem.lower())
    if stem.isdigit() and int(stem) < len(class_names):
        return int(stem)
    shown = ", ".join(class_names[:8]) + (", ..." if len(class_names) > 8 else "")
    raise ImageError(
        f"mask for unknown class {stem!r}",
        path=path,
        hint=f"name the file after a model class ({shown}) or a class index 0-{len(class_names) - 1}",
    )


def _read_binary(path: Path) -> np.ndarray:
    """The mask as a bool array (h, w); ImageError if unreadable or not binary."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            a = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(
            f"mask cannot be read ({type(err).__name__})", path=path, hint="save it as a binary 0/255 PNG"
        ) from None
    if a.ndim == 3:
        a = a[..., :3] if a.shape[2] >= 3 else a[..., :1]
        if not (a == a[..., :1]).all():
            raise ImageError(
                "mask is coloured, not binary",
                path=path,
                hint="save it as a one-channel PNG with 0 (background) and 255 (object)",
            )
        a = a[..., 0]
    if a.dtype == bool:
        out = a
    else:
        levels = np.unique(a)
        top = levels.max() if levels.size else 0
        if levels.size > 2 or (levels.size == 2 and levels[0] != 0) or top not in (0, 1, 255, 65535):
            shown = ", ".join(str(v) for v in levels[:4]) + (", ..." if levels.size > 4 else "")
            raise ImageError(
                f"mask is not binary ({levels.size} grey levels: {shown})",
                path=path,
                hint="save it with 0 and 255 only (no antialiasing, not JPEG)",
            )
        out = a > 0
    if not out.any():
        raise ImageError(
            "mask is empty (no object pixel)",
            path=path,
            hint="delete it if the class is not in the image, or redraw it",
        )
    return out


def _resize(
    mask: np.ndarray,
    size: tuple[int, int],
    crop: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> np.ndarray:
    """Resize like the image (bilinear, antialiased), keep pixels covered at least half.
    ``crop``: ``((resized h, w), (top, left))``, the image's resize then center crop to ``size``."""
    if mask.shape == tuple(size) and crop is None:
        return mask
    import torch
    from torchvision.transforms.v2 import functional as F

    t = torch.from_numpy(mask.astype(np.float32))[None]
    if crop is None:
        cover = F.resize(t, list(size), interpolation=F.InterpolationMode.BILINEAR, antialias=True)[0]
    else:
        (rh, rw), (top, left) = crop
        if (rh, rw) != mask.shape:
            t = F.resize(t, [rh, rw], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        cover = F.crop(t, top, left, int(size[0]), int(size[1]))[0]  # zeros outside
    out = cover >= 0.5
    if not out.any():  # thinner than half a pixel: keep where it is best covered
        out = cover >= cover.max() * (1 - 1e-6)
    return out.numpy()


def load_masks(
    masks_dir: Path,
    image_rel: str,
    class_names: list[str],
    size: tuple[int, int],
    image_size: tuple[int, int] | None = None,
    crop: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> dict[int, np.ndarray]:
    """The object masks of one image: ``{class index: bool (H, W)}`` at the input size.

    Args:
        masks_dir: the ``--masks`` folder.
        image_rel: the image's path relative to the audited folder (``circle/000.png``).
        class_names: the model's classes; a mask file is named after one (or its index).
        size: the model input size ``(H, W)`` the image is resized to.
        image_size: the decoded image's ``(width, height)`` (PIL order), when known: masks
            must have its aspect ratio (1 % tolerance).
        crop: ``((resized height, width), (top, left))`` of a preprocessing that resizes then
            center-crops (:meth:`saliaudit.preprocess.Preprocessing.geometry`), else ``None``.

    Returns ``{}`` when the image has no mask folder. Raises
    :class:`~saliaudit.errors.ImageError` (message naming the file and what to do) for an
    unreadable, non-binary or empty mask, an unknown class, two masks of one class, or masks
    whose size does not fit the image (or each other).
    """
    folder = mask_folder(masks_dir, image_rel)
    if not folder.is_dir():
        if folder.exists():
            raise ImageError(
                "expected a folder of masks, found a file", path=folder, hint=f"use the layout {_LAYOUT}"
            )
        return {}
    try:
        files = _mask_files(folder)
    except OSError as err:
        raise ImageError(
            f"cannot list the mask folder ({err.strerror or err})", path=folder, hint="check its permissions"
        ) from None
    out: dict[int, np.ndarray] = {}
    source: dict[int, Path] = {}
    first: tuple[Path, tuple[int, int]] | None = None
    for path in files:
        k = _class_index(path.stem, list(class_names), path)
        if k in out:
            raise ImageError(
                f"second mask for class {class_names[k]!r} (also {source[k].name})",
                path=path,
                hint="keep one mask file per class",
            )
        m = _read_binary(path)
        h, w = m.shape
        if image_size is not None:
            iw, ih = image_size
            if abs((w / h) / (iw / ih) - 1) > 0.01:
                raise ImageError(
                    f"mask is {w}x{h} but the image is {iw}x{ih} (different aspect ratio)",
                    path=path,
                    hint="save masks at the image's size",
                )
        if first is None:
            first = (path, (w, h))
        elif first[1] != (w, h):
            raise ImageError(
                f"mask is {w}x{h} but {first[0].name} is {first[1][0]}x{first[1][1]}",
                path=path,
                hint="save every mask of an image at the image's size",
            )
        out[k], source[k] = _resize(m, size, crop), path
    return out
