"""CAM layers of vision transformers: image-laid-out values the graph lost, token values, and
the default token layer.

:class:`~saliaudit.graph.GraphRunner` tracks the layout of 4-D values from the convolutions
on, but a ``(B, H·W, C)`` reshape (timm's Swin runs its MLPs on flattened tokens) or a 6-D
patch merging drops it. :func:`infer_layouts` gives such a ``(B, a, b, c)`` value the layout
whose two spatial dimensions tile the input image with one integer stride (a 7×7 grid of
32-pixel cells on a 224² input), when exactly one of NCHW and NHWC does.

Token values ``(B, T, C)`` with ``T = p + h·w`` (:mod:`saliaudit.tokens`) are read as a
``(B, C, h, w)`` map of their patch tokens. On a class-token vision transformer, the patch
tokens after the last attention no longer reach the logits (the head reads the leading
tokens only), so a CAM there is zero; :func:`default_token_layer` walks the token values back
from the output and takes the last one whose patch tokens reach the logits, tested by setting
them to NaN and running the graph (NaN survives every arithmetic op, also multiplication by a
zero weight, so the test reads the graph's structure, not its weights). On a ViT that is the
input of the last attention module, the last block's first LayerNorm, the layer
pytorch-grad-cam's ViT tutorial prescribes (``model.blocks[-1].norm1``); with a token-mean
readout it is the last token value, as the input of a CNN's global pooling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.fx

from ..graph import GraphRunner, module_path, op_name
from ..tokens import TokenGrid, token_grid
from .scopes import MIXER_OPS

__all__ = ["default_token_layer", "infer_layouts", "mixer_modules", "token_values"]

#: At most this many token values are tested (NaN runs) for the default layer.
MAX_TESTS = 48
_PASSIVE = frozenset({"dropout", "native_dropout", "clone", "alias", "contiguous"})


def _inside(path: str, modules: Iterable[str]) -> bool:
    return any(path == m or path.startswith(m + ".") for m in modules)


def mixer_modules(order: list[torch.fx.Node]) -> set[str]:
    """Module paths of the token mixers (attention): the module holding a softmax or fused
    attention op, or its parent when it holds nothing else (an ``nn.Softmax``)."""
    by_path: dict[str, set[str]] = {}
    for n in order:
        path = module_path(n)
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            by_path.setdefault(".".join(parts[:i]), set()).add(op_name(n.target))
    found = set()
    for n in order:
        if op_name(n.target) not in MIXER_OPS:
            continue
        path = module_path(n)
        if path == n.name:  # not inside a module
            continue
        if by_path.get(path, set()) <= MIXER_OPS | _PASSIVE and "." in path:
            path = path.rsplit(".", 1)[0]
        found.add(path)
    return found


def _tiles(h: int, w: int, size: tuple[int, int]) -> bool:
    """Do ``h × w`` cells of one integer stride ``s`` tile an input of ``size``, i.e.
    ``⌈H/s⌉ = h`` and ``⌈W/s⌉ = w``?"""
    if not (1 <= h <= size[0] and 1 <= w <= size[1]):
        return False
    s = math.ceil(size[0] / h)  # the smallest stride with ⌈H/s⌉ ≤ h
    while s <= max(size) and math.ceil(size[0] / s) == h:
        if math.ceil(size[1] / s) == w:
            return True
        s += 1
    return False


def infer_layouts(
    order: list[torch.fx.Node],
    shapes: dict[torch.fx.Node, tuple[int, ...]],
    layouts: dict[torch.fx.Node, str],
    batch: int,
    size: tuple[int, int],
    mixers: set[str],
) -> dict[torch.fx.Node, str]:
    """Layouts for per-image 4-D values the runner left without one (module docstring),
    outside the token mixers."""
    found = {}
    for n in order:
        shape = shapes.get(n, ())
        if n in layouts or len(shape) != 4 or shape[0] != batch or _inside(module_path(n), mixers):
            continue
        nhwc, nchw = _tiles(shape[1], shape[2], size), _tiles(shape[2], shape[3], size)
        if nhwc != nchw:
            found[n] = "NHWC" if nhwc else "NCHW"
    return found


def token_values(
    order: list[torch.fx.Node],
    shapes: dict[torch.fx.Node, tuple[int, ...]],
    batch: int,
    grids: list[tuple[int, int]],
) -> dict[torch.fx.Node, TokenGrid]:
    """The per-image ``(B, T, C)`` values whose ``T`` fits one of the patch ``grids``."""
    found = {}
    for n in order:
        shape = shapes.get(n, ())
        if len(shape) == 3 and shape[0] == batch:
            grid = token_grid(int(shape[1]), grids)
            if grid is not None:
                found[n] = grid
    return found


def _patches_reach(
    gm: torch.fx.GraphModule, probe: torch.Tensor, node: torch.fx.Node, grid: TokenGrid
) -> bool:
    """Do the logits change (become NaN) when ``node``'s patch tokens are NaN?"""

    def run_op(n, target, args, kwargs):
        out = target(*args, **kwargs)
        if n is node and isinstance(out, torch.Tensor):
            out = out.clone()
            out[:, grid.prefix :] = float("nan")
        return out

    runner = GraphRunner(gm, run_op=run_op)
    try:
        with torch.no_grad():
            out = runner.run(probe)
    except Exception:  # an op that refuses NaN: take the value (as the input of a pooling)
        return True
    logits = out[0] if isinstance(out, (tuple, list)) else out
    return isinstance(logits, torch.Tensor) and bool(torch.isnan(logits).any())


def default_token_layer(
    gm: torch.fx.GraphModule,
    probe: torch.Tensor,
    tokens: dict[torch.fx.Node, TokenGrid],
    names: dict[torch.fx.Node, str],
    mixers: set[str],
) -> tuple[torch.fx.Node | None, str, list[torch.fx.Node]]:
    """(the default token layer or None, why, the token values tested whose patches do not
    reach the logits): the last module output among the token values, outside the attention
    modules, whose patch tokens reach the logits (else the last such graph value)."""
    tried: list[torch.fx.Node] = []
    named = [n for n in tokens if n in names]
    outside = [n for n in named if not _inside(names[n], mixers)]
    # module outputs first (the last block rather than the slice of its patch tokens that a
    # token-mean readout takes), then values named by their graph node
    by_module = [n for n in outside if names[n] != n.name][-MAX_TESTS:]
    by_node = [n for n in outside if names[n] == n.name][-MAX_TESTS:]
    for n in list(reversed(by_module)) + list(reversed(by_node)):
        if _patches_reach(gm, probe, n, tokens[n]):
            if not tried:
                return n, "the last token value (its patch tokens reach the logits)", tried
            # the attention modules' own values after it, so that --cam-layer refuses the dead
            later = named[named.index(n) + 1 :]
            for m in [m for m in later if m not in tried][:MAX_TESTS]:
                if not _patches_reach(gm, probe, m, tokens[m]):
                    tried.append(m)
            lead = tokens[n].prefix
            lead_s = "the leading token" if lead == 1 else f"the {lead} leading tokens"
            why = (
                "the last token value whose patch tokens reach the logits (after it the logits "
                f"read only {lead_s})"
            )
            return n, why, tried
        tried.append(n)
    return None, "", tried
