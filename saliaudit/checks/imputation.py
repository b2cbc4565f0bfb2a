"""Noisy linear imputation (Rong et al., ICML 2022, §4), batched in torch.

ROAD fills removed pixels with what a linear model of the image predicts from their
neighbours instead of a constant, so that the shape of the removal mask leaks little
information to the model. Every removed pixel ``i`` is the weighted mean of its 8 neighbours
``j`` (weight 1/6 for the four edge neighbours, 1/12 for the four diagonals; neighbours
outside the image are left out and the remaining weights renormalized); kept pixels stay
fixed:

    d_i · v_i − Σ_j w_ij · v_j = 0  for every removed pixel i,   d_i = Σ_{j in the image} w_ij.

This is the system of the authors' code (``road_evaluation/imputations.py``, copied into
pytorch-grad-cam's ``metrics/road.py``), which solves it with SciPy's ``spsolve``, one image
at a time on the CPU. Here every image, mask and channel of a stack is solved at once, on the
input's device: the matrix is a weighted graph Laplacian restricted to the removed pixels —
symmetric, and positive definite as soon as one pixel is kept — so the conjugate gradient
method applies. Its products are the 3×3 stencil (applied as two 1-D passes on slices), and a
geometric multigrid V-cycle (one Jacobi sweep before and after, bilinear transfer to grids
half as fine, the coarse unknowns being the 2×2 blocks whose four pixels are all removed)
preconditions it, so that the number of iterations hardly grows with the size of the removed
regions (about 10–30 on images up to 224 × 224, against several hundred with Jacobi alone).
The conjugate gradients run in float64 and the preconditioner in float32 (half the memory
traffic, 1.5 times faster on a CPU; a flexible step absorbs its rounding, and the errors
against SciPy stay as they were). On Apple's ``mps``, which has no float64, everything is float32 with a
tolerance of at least :data:`FLOAT32_TOL`, and float32 rounding leaves errors up to about
2e-4 on large regions (measured on the CPU with ``dtype=torch.float32``). Gaussian noise
of standard deviation ``noise`` is then added to the removed pixels
(:func:`noisy_linear_impute`; the reference's default is 0.01, in the model's input space).

**Stopping rule.** Each system (image × mask, channel) stops when its residual falls to
``tol`` times its right-hand side, ``‖b − A v‖₂ ≤ tol · ‖b‖₂`` (``tol = 1e-8`` by default;
the residual as conjugate gradients update it),
or vanishes; converged systems leave the batch. The error of a Laplacian system can exceed
its relative residual by a factor that grows with the removed region's size; measured
against SciPy's float64 solution of the reference's system, the largest error was 2e-7 (90 %
of a 224 × 224 image removed in one region, or half of it at random), well inside the 1e-5
the imputation is held to (``tests/test_check_road.py``). A system still above the
tolerance after ``max_iter`` iterations raises :class:`~saliaudit.errors.ImputationError`.

**A mask that keeps no pixel.** The system is then singular: every connected region of
removed pixels must touch a kept pixel, and on the connected pixel grid only the whole image
does not. SciPy's ``spsolve`` warns that the matrix is singular and returns NaN; here it
raises :class:`~saliaudit.errors.ImputationError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .. import validate
from ..errors import ImputationError
from .removal import Job

__all__ = [
    "NEIGHBOUR_WEIGHTS",
    "IMPUTE_ELEMENTS",
    "FLOAT32_TOL",
    "linear_impute",
    "noisy_linear_impute",
    "run_imputed",
]

#: The 3×3 neighbour weights of the reference (the centre carries none).
NEIGHBOUR_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))
#: Elements (rows × C × H × W) imputed at once: bounds the solver's memory (about 15
#: float64 arrays of this size on the finest grid, some 130 MB) whatever the rows per pass.
IMPUTE_ELEMENTS = 1 << 20
#: The smallest tolerance a float32 solve is held to (its rounding stops it not far below).
FLOAT32_TOL = 1e-6
_OMEGA = 1.0  # Jacobi damping; the smoother converges for ω < 1.5 with these weights
_SMALLEST = 4  # no grid coarser than this many pixels on its short side


def linear_impute(
    x: torch.Tensor,
    removed: torch.Tensor,
    *,
    tol: float = 1e-8,
    max_iter: int = 500,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The linear imputation of ``x`` ``(N, C, H, W)`` where ``removed`` ``(N, H, W)`` is True,
    without noise. Kept pixels are returned unchanged; the result has ``x``'s dtype and
    device. ``dtype``: of the solver (default float64; float32 on ``mps``, where ``tol`` is
    raised to at least :data:`FLOAT32_TOL`). See the module docstring for the system and the
    stopping rule."""
    n, c, h, w = x.shape
    if tuple(removed.shape) != (n, h, w):
        raise ImputationError(f"masks of shape {tuple(removed.shape)} do not match images {tuple(x.shape)}")
    removed = removed.to(device=x.device, dtype=torch.bool)
    rows = torch.nonzero(removed.reshape(n, -1).any(1)).flatten()
    if rows.numel() == 0:
        return x.clone()
    full = int(removed.reshape(n, -1).all(1).sum())
    if full:
        raise ImputationError(
            f"{full} mask(s) remove every pixel: the linear imputation has no kept pixel to start from",
            hint="remove fewer pixels (fractions below 1)",
        )
    dt = dtype or (torch.float32 if x.device.type == "mps" else torch.float64)
    if dt != torch.float64:
        tol = max(tol, FLOAT32_TOL)
    m = removed[rows].to(dt).unsqueeze(1).expand(-1, c, -1, -1).reshape(-1, 1, h, w)
    xs = x[rows].to(dt).reshape(-1, 1, h, w)
    b = m * _neighbour_sum(xs * (1 - m))  # what the kept neighbours contribute
    v = _pcg(_Grid(m), _grids(m.float()), b, tol=tol, max_iter=max_iter)
    out = x.clone()
    out[rows] = torch.where(m.bool(), v, xs).reshape(-1, c, h, w).to(x.dtype)
    return out


def noisy_linear_impute(
    x: torch.Tensor,
    removed: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    tol: float = 1e-8,
    max_iter: int = 500,
) -> torch.Tensor:
    """:func:`linear_impute` plus ``noise`` ``(N, C, H, W)`` (already scaled, e.g.
    ``0.01 · N(0, 1)``) on the removed pixels only, as the reference's ``NoisyLinearImputer``."""
    out = linear_impute(x, removed, tol=tol, max_iter=max_iter)
    if noise is None:
        return out
    m = removed.to(device=x.device, dtype=torch.bool).unsqueeze(1)
    return torch.where(m, out + noise.to(device=x.device, dtype=x.dtype), out)


def _neighbour_sum(v: torch.Tensor) -> torch.Tensor:
    """``Σ_j w_ij v_j`` over the in-image neighbours of every pixel of ``v`` ``(S, 1, H, W)``:
    the stencil is ``([1 2 1]ᵀ [1 2 1] − 4·centre) / 12``, applied as two 1-D passes on
    slices (several times faster than ``conv2d`` in float64 on a CPU)."""
    p = F.pad(v, (1, 1, 1, 1))
    a = torch.add(p[:, :, :-2], p[:, :, 2:]).add_(p[:, :, 1:-1], alpha=2)
    b = torch.add(a[:, :, :, :-2], a[:, :, :, 2:]).add_(a[:, :, :, 1:-1], alpha=2)
    return b.sub_(v, alpha=4).mul_(1 / 12)


def run_imputed(
    model: Any,
    x: torch.Tensor,
    jobs: Sequence[Job],
    noise: Callable[[int], torch.Tensor | None],
    period: int,
    *,
    chunk: int = 64,
) -> list[torch.Tensor]:
    """Like :func:`~saliaudit.checks.removal.run_removals`, with the removed pixels imputed.

    Row ``j`` of a job's masks gets noise row ``j % period`` of ``noise(job.image)`` (a
    ``(period, C, H, W)`` tensor or ``None``). Up to ``chunk`` rows are imputed (in pieces of
    at most :data:`IMPUTE_ELEMENTS` elements) and run through ``model.logits`` together."""
    chunk = validate.integer("chunk", chunk, min=1)
    _, c, h, w = x.shape
    piece = max(1, IMPUTE_ELEMENTS // (c * h * w))
    outs: list[list[torch.Tensor]] = [[] for _ in jobs]
    rows: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (job, masks, noise)

    def flush() -> None:
        if not rows:
            return
        xs = torch.cat([x[jobs[j].image].expand(m.shape[0], -1, -1, -1) for j, m, _ in rows])
        ms = torch.cat([m for _, m, _ in rows])
        ns = None if rows[0][2] is None else torch.cat([n for _, _, n in rows]).to(x.device)
        imputed = torch.cat(
            [
                noisy_linear_impute(
                    xs[s : s + piece], ms[s : s + piece], None if ns is None else ns[s : s + piece]
                )
                for s in range(0, xs.shape[0], piece)
            ]
        )
        logits = model.logits(imputed)
        pos = 0
        for j, m, _ in rows:
            part = logits[pos : pos + m.shape[0]]
            cols = jobs[j].classes
            if cols is not None:
                part = part[:, torch.as_tensor(cols, dtype=torch.long, device=part.device)]
            outs[j].append(part)
            pos += m.shape[0]
        rows.clear()

    filled = 0
    for j, job in enumerate(jobs):
        masks = job.masks() if callable(job.masks) else job.masks
        masks = masks.to(device=x.device, dtype=torch.bool).reshape(-1, h, w)
        field = noise(job.image)
        start = 0
        while start < masks.shape[0]:
            take = min(chunk - filled, masks.shape[0] - start)
            sel = torch.arange(start, start + take) % period
            rows.append((j, masks[start : start + take], None if field is None else field[sel]))
            filled += take
            start += take
            if filled >= chunk:
                flush()
                filled = 0
    flush()
    k = getattr(model, "num_classes", 0)
    return [
        torch.cat(o)
        if o
        else torch.empty((0, k if job.classes is None else len(job.classes)), device=x.device)
        for o, job in zip(outs, jobs)
    ]


class _Grid:
    """One grid of the multigrid preconditioner: which pixels are unknown (``m``, one row per
    system), the in-image neighbour weight sums ``d`` and the operator ``m · (d·v − W v)``."""

    def __init__(self, m: torch.Tensor, d: torch.Tensor | None = None):
        self.m = m
        self.d = _neighbour_sum(torch.ones_like(m[:1])) if d is None else d
        self.inv = m / self.d  # the Jacobi preconditioner on the unknowns, 0 elsewhere

    def select(self, keep: torch.Tensor) -> _Grid:
        return _Grid(self.m[keep], self.d)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return self.m * (self.d * v - _neighbour_sum(v))


def _grids(m: torch.Tensor) -> list[_Grid]:
    """The fine grid and ever coarser ones while they have unknowns."""
    grids = [_Grid(m)]
    while min(grids[-1].m.shape[2:]) >= 2 * _SMALLEST:
        fine = grids[-1].m
        h, w = fine.shape[2:]
        coarse = F.avg_pool2d(F.pad(fine, (0, w % 2, 0, h % 2)), 2) > 0.999  # all four removed
        if not bool(coarse.any()):
            break
        grids.append(_Grid(coarse.to(m.dtype)))
    return grids


def _restrict1(r: torch.Tensor, dim: int) -> torch.Tensor:
    """Full weighting along ``dim`` to a grid half as fine: coarse ``I`` takes fine
    ``2I−1 … 2I+2`` with weights 1/4, 3/4, 3/4, 1/4 (zero beyond the edges)."""
    n = r.shape[dim]
    pad = [0, 0, 0, 0]
    pad[2 * (3 - dim)], pad[2 * (3 - dim) + 1] = 1, 2 + n % 2
    p = F.pad(r, pad)
    nc = (n + 1) // 2

    def tap(start: int) -> torch.Tensor:
        return p.narrow(dim, start, 2 * nc).unflatten(dim, (nc, 2)).select(dim + 1, 0)

    return (tap(1) + tap(2)).mul_(0.75).add_(tap(0) + tap(3), alpha=0.25)


def _prolong1(c: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """The transpose of :func:`_restrict1`: fine ``2J`` = 3/4·c[J] + 1/4·c[J−1], fine ``2J+1`` =
    3/4·c[J] + 1/4·c[J+1], cropped to ``n``."""
    nc = c.shape[dim]
    pad = [0, 0, 0, 0]
    pad[2 * (3 - dim)], pad[2 * (3 - dim) + 1] = 1, 1
    p = F.pad(c, pad)
    mid = p.narrow(dim, 1, nc) * 0.75
    even = mid + 0.25 * p.narrow(dim, 0, nc)
    odd = mid + 0.25 * p.narrow(dim, 2, nc)
    return torch.stack([even, odd], dim + 1).flatten(dim, dim + 1).narrow(dim, 0, n)


def _restrict(r: torch.Tensor) -> torch.Tensor:
    return _restrict1(_restrict1(r, 2), 3)


def _prolong(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return _prolong1(_prolong1(v, 2, h), 3, w)


def _vcycle(grids: list[_Grid], r: torch.Tensor) -> torch.Tensor:
    """One symmetric V-cycle applied to ``r``: a symmetric positive definite preconditioner
    (the same Jacobi sweep before and after the coarse correction, restriction = the
    prolongation's transpose)."""
    g = grids[0]
    v = _OMEGA * g.inv * r
    if len(grids) > 1:
        rc = grids[1].m * _restrict(r - g.apply(v))
        v = v + g.m * _prolong(_vcycle(grids[1:], rc), *r.shape[2:])
    return v + _OMEGA * g.inv * (r - g.apply(v))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum((1, 2, 3))


def _pcg(fine: _Grid, pre: list[_Grid], b: torch.Tensor, *, tol: float, max_iter: int) -> torch.Tensor:
    """Preconditioned conjugate gradients for every system ``(S, 1, H, W)`` at once, each with
    its own step sizes; a system leaves the batch once ``‖r‖ ≤ tol · ‖b‖`` (or ``r = 0``).
    ``fine`` applies the matrix in the solver's precision; ``pre`` (the multigrid
    preconditioner) may be float32: the flexible (Polak–Ribière) step keeps the iteration
    converging when the preconditioner is only applied to float32 accuracy."""
    s = b.shape[0]
    v = torch.zeros_like(b)
    idx = torch.arange(s, device=b.device)
    goal = tol * _dot(b, b).sqrt()

    def precondition(r: torch.Tensor) -> torch.Tensor:
        return _vcycle(pre, r.to(pre[0].m.dtype)).to(r.dtype)

    r = b.clone()
    z = precondition(r)
    p = z.clone()
    rz = _dot(r, z)
    done = _dot(r, r).sqrt() <= goal
    for it in range(max_iter + 1):
        if bool(done.any()):
            keep = ~done
            idx, r, z, p, rz, goal = idx[keep], r[keep], z[keep], p[keep], rz[keep], goal[keep]
            fine, pre = fine.select(keep), [g.select(keep) for g in pre]
            if idx.numel() == 0:
                return v
        if it == max_iter:
            break
        q = fine.apply(p)
        alpha = (rz / _dot(p, q)).view(-1, 1, 1, 1)
        v.index_add_(0, idx, alpha * p)
        r = r - alpha * q
        rnorm = _dot(r, r).sqrt()
        done = (rnorm <= goal) | (rnorm == 0)
        z_new = precondition(r)
        rz_new = _dot(r, z_new)
        beta = (rz_new - _dot(r, z)) / torch.where(rz == 0, torch.ones_like(rz), rz)
        p = z_new + beta.clamp_min(0).view(-1, 1, 1, 1) * p
        z, rz = z_new, rz_new
    raise ImputationError(
        f"the linear imputation did not reach its tolerance {tol:g} in {max_iter} iterations "
        f"for {idx.numel()} of {s} systems",
        hint="this should not happen; please report it with the image size",
    )
