"""The cost of an audit in model passes: what each method and check declares, what a pass
costs on the user's model, and a counter of the passes actually run.

Every method declares the passes one map computation needs per image (:meth:`Method.passes`:
a gradient is one forward and backward row, integrated gradients ``steps × n_baselines``);
every check declares what it adds per measured image on top of a method's maps
(:meth:`Check.cost`, :meth:`Check.shared_cost`). :class:`Calibration` measures one forward
and one forward+backward pass of the model at the audit's batch size and the time of one map
comparison, so that a count of passes becomes seconds (:mod:`saliaudit.plan`).
:class:`PassCounter` counts the rows that really go through the model, per stage, so that
the declared counts are checked on every audit. :func:`rows_per_pass` is the number of rows
one pass may hold: the audit's ``--batch-size``, so that memory is bounded by the batch.
"""

from __future__ import annotations

import contextlib
import gc
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "Passes",
    "CostContext",
    "Calibration",
    "calibrate",
    "PassCounter",
    "rows_per_pass",
    "rows_for",
    "rows_limit",
    "peak_rss_bytes",
]

_ROWS: ContextVar[tuple[int, int]] = ContextVar("saliaudit_rows_per_pass", default=(16, 64))

#: Activation memory one pass may hold: a forward+backward pass keeps every activation, a
#: forward pass only about one layer's. Large chunks of a big model are slower per row on a
#: CPU (fresh pages for every large buffer) and risk running out of memory; small chunks of a
#: small model pay Python overhead per call. The rows per pass are set from these targets.
BACKWARD_BYTES = 1 << 30
FORWARD_BYTES = 64 << 20
MAX_ROWS = 64


def rows_per_pass(value: int | None = None, kind: str = "backward") -> int:
    """``value`` when given, else the rows one pass may hold in the running audit: for
    ``backward`` (forward+backward) passes, as many rows as fit :data:`BACKWARD_BYTES` of
    activations, for ``forward`` passes :data:`FORWARD_BYTES` for the largest activation; never
    fewer than the audit's ``--batch-size`` nor more than :data:`MAX_ROWS` (16 and 64 outside
    an audit). Methods and checks chunk their extra rows (IG steps, SmoothGrad samples,
    perturbed copies) by this, so that peak memory does not grow with them."""
    if value is not None:
        return int(value)
    backward, forward = _ROWS.get()
    return forward if kind == "forward" else backward


def rows_for(batch: int, activation_bytes: int, largest_bytes: int) -> dict[str, int]:
    """Rows per backward and forward pass for a model with these activation sizes per row."""

    def rows(target: int, per_row: int) -> int:
        fit = target // per_row if per_row > 0 else MAX_ROWS
        return int(max(batch, min(MAX_ROWS, fit)))

    return {"backward": rows(BACKWARD_BYTES, activation_bytes), "forward": rows(FORWARD_BYTES, largest_bytes)}


@contextlib.contextmanager
def rows_limit(rows: dict[str, int]) -> Iterator[None]:
    """Within the block, :func:`rows_per_pass` gives ``rows[kind]``."""
    token = _ROWS.set((max(1, int(rows["backward"])), max(1, int(rows["forward"]))))
    try:
        yield
    finally:
        _ROWS.reset(token)


@dataclass(frozen=True)
class Passes:
    """Work per image (or in all): rows through the model without gradients (``forward``),
    rows through the model and back to the input (``backward``: one forward plus one
    backward), map comparisons (``compare``: one similarity measure of two maps) and, in a
    check's cost, computations of the audited method's maps (``maps``: each costs the passes
    the method declares, and its time is measured per method), and images imputed by ROAD's
    noisy linear imputation (``impute``: one image and removal mask; no model pass)."""

    forward: float = 0.0
    backward: float = 0.0
    compare: float = 0.0
    maps: float = 0.0
    impute: float = 0.0

    def __add__(self, other: Passes) -> Passes:
        return Passes(
            self.forward + other.forward,
            self.backward + other.backward,
            self.compare + other.compare,
            self.maps + other.maps,
            self.impute + other.impute,
        )

    def __mul__(self, k: float) -> Passes:
        return Passes(self.forward * k, self.backward * k, self.compare * k, self.maps * k, self.impute * k)

    __rmul__ = __mul__

    @property
    def empty(self) -> bool:
        return not (self.forward or self.backward or self.compare or self.maps or self.impute)

    def to_dict(self) -> dict[str, float]:
        return {k: round(float(v), 3) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class CostContext:
    """What a check's :meth:`~saliaudit.checks.base.Check.cost` knows about one method.

    Attributes:
        method: the passes of one map computation of the method per image (a check declares
            map computations as ``Passes(maps=k)``; this is for checks whose other work
            depends on the method).
        variants: the method's map variants (ψ presets or post-processings).
        signed: how many of them keep the sign.
        size: the model's input size ``(H, W)``.
        model: the loaded model (read only; e.g. to count randomization steps).
        model_independent: the method's maps do not depend on the model (controls).
    """

    method: Passes
    variants: int
    size: tuple[int, int]
    signed: int = 0
    model: Any = None
    model_independent: bool = False


@dataclass
class Calibration:
    """Measured on the user's model before the audit (seconds per row at ``batch`` rows)."""

    batch: int
    forward_s: float
    backward_s: float
    compare_s: float
    activation_bytes: int  # per row, kept for the backward pass
    largest_bytes: int  # per row, the largest single activation
    parameter_bytes: int
    base_rss: int  # the process after loading the model
    device: str = "cpu"
    error: str | None = None  # why the passes could not be timed (the plan has no estimate)
    impute_s: float = 0.0  # one image and mask of ROAD's imputation (0: not measured)

    @classmethod
    def unmeasured(cls, batch: int, error: str) -> Calibration:
        """A calibration whose passes could not be timed: every estimate is 0."""
        return cls(batch, 0.0, 0.0, 0.0, 0, 0, 0, peak_rss_bytes(), error=error)

    def seconds(self, p: Passes) -> float:
        """Estimated seconds of ``p``."""
        return self.floor(p) + p.compare * self.compare_s + p.impute * self.impute_s

    def floor(self, p: Passes) -> float:
        """Seconds of ``p``'s model passes alone: no audit can do them faster."""
        return p.forward * self.forward_s + p.backward * self.backward_s

    def rows(self) -> dict[str, int]:
        """Rows per backward and forward pass (:func:`rows_for`)."""
        return rows_for(self.batch, self.activation_bytes, self.largest_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "forward_s_per_row": round(self.forward_s, 6),
            "backward_s_per_row": round(self.backward_s, 6),
            "compare_s": round(self.compare_s, 6),
            "impute_s_per_row": round(self.impute_s, 6),
            "activation_bytes_per_row": int(self.activation_bytes),
            "largest_activation_bytes_per_row": int(self.largest_bytes),
            "rows_per_pass": self.rows(),
            "parameter_bytes": int(self.parameter_bytes),
            "base_rss_bytes": int(self.base_rss),
            "device": self.device,
            "error": self.error,
        }


def _libc_trim() -> Any:
    """glibc's ``malloc_trim``, or ``None`` elsewhere (macOS, musl, Windows)."""
    try:
        import ctypes

        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()


def release_memory(collect: bool = True) -> None:
    """Give memory that a finished stage freed back to the system: collect cyclic garbage and,
    with glibc, return the allocator's free pages (``malloc_trim``). Without it, CPU memory a
    stage freed stays resident in the allocator's arenas, so the process's peak becomes the
    sum of fragments of earlier stages rather than the largest stage. Called between stages,
    never inside hot loops; on CUDA the caching allocator keeps its blocks for reuse.
    ``collect=False`` skips the garbage collection (about 0.1 s with torch loaded)."""
    if collect:
        gc.collect()
    if _TRIM is not None:
        _TRIM(0)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _activation_bytes(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Bytes of all module outputs of one forward pass of ``x`` (what autograd keeps) and of
    the largest one."""
    total, largest = 0, 0

    def hook(_m: Any, _i: Any, out: Any) -> None:
        nonlocal total, largest
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
                largest = max(largest, t.numel() * t.element_size())

    leaves = [m for m in module.modules() if not list(m.children())] or [module]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return total, largest


def calibrate(model: Any, batch: int, repeats: int = 2, *, impute: bool = False) -> Calibration:
    """Measure the activation memory of a row of ``model`` (a LoadedModel), then time one
    forward and one forward+backward pass at the rows per pass the audit will use (median of
    ``repeats`` after a warm-up; seconds per row) and one map comparison at the input size;
    with ``impute``, also ROAD's imputation of one image (:func:`impute_seconds`)."""
    from .checks.similarity import METRICS, Maps, similarity
    from .methods.common import forward_fn, input_gradient

    h, w = model.input_size
    device = torch.device(getattr(model, "device", "cpu") or "cpu")
    gen = torch.Generator().manual_seed(0)
    module = getattr(model, "module", model)
    one = torch.randn(1, 3, h, w, generator=gen).to(device)
    try:
        act, largest = _activation_bytes(module, one) if isinstance(module, torch.nn.Module) else (0, 0)
    except Exception:  # a graph that cannot be hooked: the default rows are used
        act, largest = 0, 0
    params = (
        sum(p.numel() * p.element_size() for p in module.parameters()) if hasattr(module, "parameters") else 0
    )
    rows = rows_for(batch, act, largest)
    fwd = forward_fn(model)

    def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 3, h, w, generator=gen).to(device)
        return x, torch.zeros(n, dtype=torch.long, device=device)

    def timed(fn: Any, n: int) -> float:
        fn()  # warm-up
        _sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / n

    xf, _ = inputs(rows["forward"])
    with torch.no_grad():
        forward_s = timed(lambda: fwd(xf), len(xf))
    xb, tb = inputs(rows["backward"])
    backward_s = timed(lambda: input_gradient(model, xb, tb, fwd), len(xb))
    maps = torch.rand(2, min(batch, 4), h, w, generator=gen)

    def compare() -> None:
        ref, other = Maps(maps[0]), Maps(maps[1])
        for metric in METRICS:
            similarity(ref, other, metric)

    compare_s = timed(compare, maps.shape[1] * len(METRICS))
    return Calibration(
        batch,
        forward_s,
        backward_s,
        compare_s,
        act,
        largest,
        params,
        peak_rss_bytes(),
        str(device),
        impute_s=impute_seconds((h, w), device) if impute else 0.0,
    )


def impute_seconds(
    size: tuple[int, int], device: torch.device | str = "cpu", rows: int = 4, repeats: int = 2
) -> float:
    """Seconds per image and mask of ROAD's noisy linear imputation at input ``size``: the
    median of ``repeats`` runs (after a one-image warm-up) on ``rows`` images with masks that
    remove 1/8, 3/8, 5/8 and 7/8 of the pixels, alternately in one region (a disc, as a smooth
    map removes them: the slow case) and scattered at random (as a random order or a noisy
    map: the fast case)."""
    from .checks.imputation import linear_impute

    h, w = size
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dist = ((yy - h / 3) ** 2 + (xx - w / 3) ** 2).flatten().double() + 1e-6 * torch.arange(h * w)
    order = torch.argsort(torch.argsort(dist))  # rank of each pixel's distance
    masks = []
    for j in range(rows):
        k = min(h * w - 1, max(1, round((j + 0.5) / rows * h * w)))
        if j % 2 == 0:
            masks.append((order < k).view(h, w))
        else:
            masks.append((torch.randperm(h * w, generator=gen) < k).view(h, w))
    x = torch.randn(rows, 3, h, w, generator=gen).to(device)
    m = torch.stack(masks).to(device)
    linear_impute(x[1:2], m[1:2])  # warm-up
    times = []
    for _ in range(repeats):
        _sync(torch.device(device))
        t0 = time.perf_counter()
        linear_impute(x, m)
        _sync(torch.device(device))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / rows


@dataclass
class PassCounter:
    """Counts the rows that go through any model while active, per named stage.

    A pass is a call of a root ``nn.Module`` (one not called from inside another module's
    forward); its rows are its first tensor argument's batch size, counted as ``backward``
    when autograd is recording, else ``forward``. Global module hooks are used (none is put on
    the user's model) and removed on exit, also after an exception.
    """

    stage: str = "other"
    counts: dict[str, list[float]] = field(default_factory=dict)
    _depth: int = 0

    def _pre(self, _module: Any, args: Any) -> None:
        self._depth += 1
        if self._depth == 1:
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if x is not None and x.dim() > 0:
                c = self.counts.setdefault(self.stage, [0.0, 0.0])
                c[1 if torch.is_grad_enabled() else 0] += int(x.shape[0])

    def _post(self, _module: Any, _args: Any, _out: Any) -> None:
        self._depth = max(0, self._depth - 1)

    @contextlib.contextmanager
    def active(self) -> Iterator[PassCounter]:
        from torch.nn.modules import module as mod

        pre = mod.register_module_forward_pre_hook(self._pre)
        post = mod.register_module_forward_hook(self._post, always_call=True)
        try:
            yield self
        finally:
            pre.remove()
            post.remove()
            self._depth = 0

    @contextlib.contextmanager
    def at(self, stage: str) -> Iterator[None]:
        """Count into ``stage`` within the block (restores the previous stage)."""
        before, self.stage = self.stage, stage
        try:
            yield
        finally:
            self.stage = before

    def passes(self, stage: str) -> Passes:
        f, b = self.counts.get(stage, [0.0, 0.0])
        return Passes(forward=f, backward=b)
