"""How an image becomes the model's input: the resize and crop policy of :class:`Preprocessing`
(see docs/usage.md, "Preprocessing").

The default reproduces saliaudit's own transform: the RGB image is scaled to [0, 1] and resized
straight to the input size (bilinear, antialiased, aspect ratio not kept). A model whose source
describes its evaluation transform gets that transform instead:

* timm (``pretrained_cfg``): the shorter side resized to ``floor(size / crop_pct)`` (for a
  non-square input, the side that needs the smaller scale, as timm's ``ResizeKeepRatio``), then a
  center crop to the input size, with the model's interpolation; the resize runs on the 8-bit PIL
  image, as timm's own eval transform does (``timm.data.create_transform``);
* Hugging Face image processors (``preprocessor_config.json``): ``size`` (height/width, or
  ``shortest_edge``) then ``crop_size``, on an 8-bit tensor (the torchvision backend) or the PIL
  image (the PIL backend), with the processor's rescale factor.

PIL and torchvision resize differently (PIL rounds to 8 bits after its own filter); each policy
uses the library of the transform it reproduces, so that the input equals the source's to float
rounding. Normalization (mean, std) stays on :class:`~saliaudit.model.LoadedModel`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image

__all__ = ["Preprocessing", "INTERPOLATIONS"]

#: Interpolation names (PIL's ``Image.Resampling`` and torchvision's ``InterpolationMode``).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
RESIZES = ("stretch", "shorter", "exact")
BACKENDS = ("tensor", "pil", "tensor_uint8")


@dataclass(frozen=True)
class Preprocessing:
    """The geometry of the input: resize (then center crop) an image to ``input_size``.

    ``resize``: ``stretch`` (to the input size, aspect ratio not kept: saliaudit's default),
    ``shorter`` (keep the aspect ratio: the shorter side to the target, then center crop) or
    ``exact`` (to the target height and width, then center crop). The target is
    ``resize_size`` when the source gives one, else ``floor(input_size / crop_pct)``.
    ``backend``: ``tensor`` (float tensor, antialiased: saliaudit's default), ``pil`` (the 8-bit
    PIL image, as timm and Hugging Face's PIL processors) or ``tensor_uint8`` (an 8-bit tensor,
    as Hugging Face's torchvision processors). ``crop_offset``: how a center crop places an odd
    margin, ``round`` (torchvision's ``CenterCrop``) or ``floor`` (Hugging Face's).
    ``rescale``: the factor from 8-bit values to the model's range (1/255, or 1 for a model fed
    0..255).
    """

    resize: str = "stretch"
    resize_size: tuple[int, int] | None = None
    crop_pct: float | None = None
    interpolation: str = "bilinear"
    backend: str = "tensor"
    crop_offset: str = "round"
    rescale: float = 1 / 255

    def __post_init__(self) -> None:
        if self.resize not in RESIZES or self.backend not in BACKENDS:
            raise ValueError(f"unknown resize {self.resize!r} or backend {self.backend!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.crop_offset not in ("round", "floor"):
            raise ValueError(f"unknown crop_offset {self.crop_offset!r}")

    @property
    def is_default(self) -> bool:
        return self == Preprocessing()

    def to_dict(self) -> dict[str, Any]:
        """What results.json records (``model.preprocessing``)."""
        d = asdict(self)
        d["resize_size"] = list(self.resize_size) if self.resize_size else None
        d["center_crop"] = self.resize != "stretch"
        return d

    def scaled(self, old: Sequence[int], new: Sequence[int]) -> Preprocessing:
        """The policy for input size ``new`` instead of ``old``: a fixed resize target scales
        with it (a ``crop_pct`` target follows the input size by itself)."""
        if self.resize_size is None or tuple(old) == tuple(new):
            return self
        h, w = self.resize_size
        return replace(
            self, resize_size=(max(1, round(h * new[0] / old[0])), max(1, round(w * new[1] / old[1])))
        )

    # ------------------------------------------------------------------ geometry
    def target(self, input_size: Sequence[int]) -> tuple[int, int]:
        """Where the resize goes before the crop: ``resize_size``, else ``input / crop_pct``."""
        if self.resize == "stretch":
            return int(input_size[0]), int(input_size[1])
        if self.resize_size is not None:
            return int(self.resize_size[0]), int(self.resize_size[1])
        pct = self.crop_pct or 1.0
        return math.floor(input_size[0] / pct), math.floor(input_size[1] / pct)

    def geometry(
        self, image_size: tuple[int, int], input_size: Sequence[int]
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((resized height, width), (crop top, left))`` for a PIL ``image_size`` (width,
        height); a negative offset means the crop reaches past the resized image (zero
        padding, as torchvision and Hugging Face pad)."""
        w, h = image_size
        th, tw = self.target(input_size)
        if self.resize in ("stretch", "exact"):
            rh, rw = th, tw
        elif th == tw:  # torchvision Resize(int) / Hugging Face shortest_edge
            if w <= h:
                rw, rh = th, int(th * h / w)
            else:
                rh, rw = th, int(th * w / h)
        else:  # timm ResizeKeepRatio: the smaller of the two scales
            ratio = min(h / th, w / tw)
            rh, rw = round(h / ratio), round(w / ratio)
        ch, cw = int(input_size[0]), int(input_size[1])
        return (rh, rw), (self._offset(rh, ch), self._offset(rw, cw))

    def _offset(self, size: int, crop: int) -> int:
        pad = (crop - size) // 2 if crop > size else 0
        margin = max(size, crop) - crop
        return (int(round(margin / 2.0)) if self.crop_offset == "round" else margin // 2) - pad

    def visible_box(
        self, image_size: tuple[int, int], input_size: Sequence[int]
    ) -> tuple[int, int, int, int]:
        """The region of the original image the model sees, as a PIL box (left, top, right,
        bottom) rounded to whole pixels (the whole image for ``stretch``)."""
        w, h = image_size
        if self.resize == "stretch":
            return 0, 0, w, h
        (rh, rw), (top, left) = self.geometry(image_size, input_size)
        sx, sy = w / rw, h / rh
        return (
            round(left * sx),
            round(top * sy),
            round((left + int(input_size[1])) * sx),
            round((top + int(input_size[0])) * sy),
        )

    # ------------------------------------------------------------------ pixels
    def pixels(self, img: PIL.Image.Image, input_size: Sequence[int]) -> torch.Tensor:
        """An RGB PIL image -> float32 ``(3, H, W)`` at ``input_size``, rescaled, not normalized."""
        from torchvision.transforms.v2 import functional as F

        if img.mode != "RGB":
            img = img.convert("RGB")
        size = [int(input_size[0]), int(input_size[1])]
        if self.resize == "stretch" and self.backend == "tensor":  # saliaudit's own transform
            t = _unit(F.pil_to_tensor(img), self.rescale)
            t = F.resize(t, size, interpolation=_mode(self.interpolation), antialias=True)
            return t.clamp_(0.0, 255 * self.rescale)
        (rh, rw), (top, left) = self.geometry(img.size, size)
        if self.backend == "pil":
            from PIL import Image

            if (rw, rh) != img.size:
                img = img.resize((rw, rh), Image.Resampling[self.interpolation.upper()])
            if (top, left, rh, rw) != (0, 0, *size):
                img = img.crop((left, top, left + size[1], top + size[0]))  # zeros outside
            return _scaled(F.pil_to_tensor(img), self.rescale)
        t = F.pil_to_tensor(img)
        if self.backend == "tensor":
            t = _unit(t, self.rescale)
        if (rh, rw) != tuple(t.shape[-2:]):
            t = F.resize(t, [rh, rw], interpolation=_mode(self.interpolation), antialias=True)
        if (top, left, rh, rw) != (0, 0, *size):
            t = F.crop(t, top, left, size[0], size[1])  # zero padding outside
        return t if self.backend == "tensor" else _scaled(t, self.rescale)

    def describe(self, input_size: Sequence[int]) -> str:
        """One line for the report: ``shorter side to 256, center crop 224×224, bicubic (PIL)``."""
        h, w = int(input_size[0]), int(input_size[1])
        lib = {"tensor": "torchvision", "pil": "PIL", "tensor_uint8": "torchvision, 8-bit"}[self.backend]
        if self.resize == "stretch":
            text = f"resize to {h}×{w}"
        else:
            th, tw = self.target(input_size)
            first = (
                f"shorter side to {th}" if self.resize == "shorter" and th == tw else f"resize to {th}×{tw}"
            )
            if self.resize == "shorter" and th != tw:
                first = f"keep ratio to cover {th}×{tw}"
            text = f"{first}, center crop {h}×{w}" if (th, tw) != (h, w) else first
        scale = "" if abs(self.rescale * 255 - 1) < 1e-9 else f", rescale ×{self.rescale:g}"
        return f"{text}, {self.interpolation} ({lib}){scale}"


def _mode(name: str) -> Any:
    from torchvision.transforms.v2 import functional as F

    return F.InterpolationMode[name.upper()]


def _unit(t: torch.Tensor, rescale: float) -> torch.Tensor:
    """8-bit values to float32 as torchvision's ``to_dtype(scale=True)`` (saliaudit's default),
    times ``255 * rescale`` when the model wants another range."""
    from torchvision.transforms.v2 import functional as F

    t = F.to_dtype(t, torch.float32, scale=True)
    return t if abs(rescale * 255 - 1) < 1e-12 else t.mul_(255 * rescale)


def _scaled(t: torch.Tensor, rescale: float) -> torch.Tensor:
    """8-bit values to float32 times ``rescale`` (``/255`` exactly, as ToTensor, for 1/255)."""
    if abs(rescale * 255 - 1) < 1e-12:
        return t.to(torch.float32).div_(255)
    return t.to(torch.float32).mul_(rescale)
