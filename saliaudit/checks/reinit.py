"""Working copies of a model with re-initialized parameters, for the randomization check.

Copies only. The user's model is never touched: the check deep-copies the model's ATen graph
(:func:`saliaudit.graph.get_graph`, the graph every graph-based method runs; for an eager
module that is its ``torch.export`` capture, for a ``.pt2`` the exported program's module) once,
or a TorchScript/eager module that cannot be exported, and wraps the copy as
``dataclasses.replace(model, module=copy, exported=None)``. Gradient methods run ``module``,
graph methods find the copy itself as their graph (an ATen ``GraphModule`` is its own graph),
so every method really runs the randomized weights. The copy is randomized *in place* step by
step (docs/checks.md) and restored afterwards; the randomized values are drawn once per audit
(lazily, kept on the check) so every method and every batch meets the same randomized models,
and a fresh wrapper object per step keeps per-model caches (FullGrad's decomposition) from
returning stale results.

Steps (``granularity``):

* ``blocks`` (default): parameters are grouped by module path — the prefix up to the first
  numbered component (a sequential container's element: ``features.3``, ``layer1.0``,
  ``classifier.2``); without one, the top-level child (``conv1``, ``fc``), or one level deeper
  when that child holds two or more parametrized children (``features.denseblock1``). A group
  whose parameters are all 1-D (a normalization layer such as ``features.1`` or ``bn1``) joins
  the group that runs just before it, named ``conv1+bn1``.
* ``layers``: every parametrized module is one step.

Order: by the position in the graph of the first op that uses a group's parameters (the last
one first); the module's parameter order when there is no graph. Buffers (batch-norm running
statistics) are kept.

Re-initialization (``reinit``), per parameter, with a CPU ``torch.Generator`` seeded by
``crc32(f"{seed}/{module path}")`` — the same values at either granularity, for every batch:

* ``default`` — PyTorch's ``reset_parameters``, derived from the shapes (a graph has no
  ``nn.Conv2d`` objects): a weight of ≥ 2 dimensions ``kaiming_uniform_(a=√5)`` (U(±1/√fan_in)),
  its module's bias U(±1/√fan_in); a 1-D ``weight`` (normalization) 1 and its ``bias`` 0; any
  other 2-D+ parameter as a weight, any other 1-D/0-D parameter N(0, σ) as in ``normal``.
  Draws happen in the module's parameter order (weight, then bias), so a conv or linear layer
  gets exactly what ``torch.manual_seed(s); layer.reset_parameters()`` gives.
* ``normal`` — every parameter N(0, σ) with σ the (population) standard deviation of the
  trained tensor (its mean |value| when that is 0).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import zlib
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import DecompositionError, UsageError

__all__ = [
    "RandomizedModels",
    "GRANULARITIES",
    "REINITS",
    "REINIT_TEXT",
    "group_parameters",
    "reinit_values",
    "module_seed",
]

GRANULARITIES = ("blocks", "layers")
REINITS = ("default", "normal")
REINIT_TEXT = {
    "default": (
        "PyTorch default initialization (reset_parameters): weights of 2+ dimensions "
        "kaiming_uniform(a=sqrt(5)), their biases U(±1/sqrt(fan_in)); normalization "
        "weight 1, bias 0; running statistics kept; other parameters N(0, std of the "
        "trained tensor)"
    ),
    "normal": (
        "every parameter N(0, σ) with σ the standard deviation of the trained tensor; running statistics kept"
    ),
}


def module_seed(seed: int, module_path: str) -> int:
    """The generator seed of one module's parameters: ``crc32(f"{seed}/{module_path}")``."""
    return zlib.crc32(f"{int(seed)}/{module_path}".encode())


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _block_of(name: str, split_top: set[str]) -> str:
    """The block of parameter ``name`` (see the module docstring, ``blocks``)."""
    path = _module_of(name)
    if not path:
        return name  # a parameter of the root module (e.g. a class token)
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    if parts[0] in split_top and len(parts) >= 2:
        return ".".join(parts[:2])
    return parts[0]


def _first_use(module: torch.nn.Module, names: list[str]) -> dict[str, int] | None:
    """Position in the graph of the first op using each parameter (None without a graph)."""
    graph = getattr(module, "graph", None)
    if not isinstance(module, torch.fx.GraphModule) or graph is None:
        return None
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    first: dict[str, int] = {}
    for n in nodes:
        if n.op == "get_attr" and isinstance(n.target, str):
            uses = [pos[u] for u in n.users if u in pos]
            if uses:
                first[n.target] = min(first.get(n.target, len(nodes)), min(uses))
    if any(k not in first for k in names):
        return None
    return first


def group_parameters(
    module: torch.nn.Module, granularity: str = "blocks", max_steps: int | None = None
) -> list[tuple[str, list[str]]]:
    """The randomization steps of ``module``: ``[(step name, [parameter names])]`` ordered from
    the output towards the input (see the module docstring). With ``max_steps``, consecutive
    steps are merged into at most that many (as even as possible, the output side first):
    a coarser cascade over the same layers (the output layer stays alone), named
    ``last…first`` of each merged run."""
    params = dict(module.named_parameters())
    names = list(params)
    if not names:
        raise UsageError(
            "the model has no parameters to randomize",
            hint="the randomization check needs a model with learned weights",
        )
    first = _first_use(module, names)
    order = {n: (first[n] if first is not None else i) for i, n in enumerate(names)}
    groups: dict[str, list[str]] = {}
    if granularity == "layers":
        for n in names:
            groups.setdefault(_module_of(n) or n, []).append(n)
    else:
        children: dict[str, set[str]] = {}
        for n in names:
            parts = _module_of(n).split(".")
            if len(parts) >= 2 and parts[0]:
                children.setdefault(parts[0], set()).add(parts[1])
        split_top = {top for top, kids in children.items() if len(kids) >= 2}
        for n in names:
            groups.setdefault(_block_of(n, split_top), []).append(n)
    # forward order: by the first use of any of the group's parameters
    forward = sorted(groups.items(), key=lambda kv: min(order[n] for n in kv[1]))
    if granularity == "blocks":
        merged: list[tuple[str, list[str]]] = []
        for name, members in forward:
            if merged and all(params[m].dim() <= 1 for m in members):
                prev_name, prev = merged[-1]
                merged[-1] = (f"{prev_name}+{name}", prev + members)
            else:
                merged.append((name, list(members)))
        forward = merged
    steps = list(reversed(forward))
    if max_steps is not None and 0 < int(max_steps) < len(steps):
        steps = _coarsen(steps, int(max_steps))
    return steps


def _coarsen(steps: list[tuple[str, list[str]]], k: int) -> list[tuple[str, list[str]]]:
    """``steps`` merged into ``k`` consecutive runs: the output layer stays a step of its own
    (randomizing it alone is the headline comparison), the rest is split into ``k − 1`` runs of
    (nearly) equal length."""
    if k == 1:
        return [(f"{steps[0][0]}…{steps[-1][0]}", [n for _, members in steps for n in members])]
    rest = steps[1:]
    bounds = [round(i * len(rest) / (k - 1)) for i in range(k)]
    out = [steps[0]]
    for a, b in zip(bounds, bounds[1:]):
        run = rest[a:b]
        name = run[0][0] if len(run) == 1 else f"{run[0][0]}…{run[-1][0]}"
        out.append((name, [n for _, members in run for n in members]))
    return out


def _sigma(t: torch.Tensor) -> float:
    t = t.detach().to(torch.float64)
    s = float(t.std(unbiased=False)) if t.numel() > 1 else 0.0
    if not math.isfinite(s) or s == 0.0:
        s = float(t.abs().mean()) if t.numel() else 0.0
    return s if math.isfinite(s) else 0.0


def reinit_values(
    params: dict[str, torch.Tensor], names: list[str], seed: int, scheme: str = "default"
) -> dict[str, torch.Tensor]:
    """Re-initialized values (float32, CPU) for the parameters ``names`` of ``params``.

    One generator per module path (``module_seed``), drawing the module's parameters in their
    order (weight before bias), so the values do not depend on how parameters are grouped.
    """
    by_module: dict[str, list[str]] = {}
    for n in names:
        by_module.setdefault(_module_of(n), []).append(n)
    out: dict[str, torch.Tensor] = {}
    for mod, members in by_module.items():
        gen = torch.Generator().manual_seed(module_seed(seed, mod or members[0]))
        # siblings of the module (all of its parameters, to find a bias's weight)
        weight = params.get(f"{mod}.weight" if mod else "weight")
        for n in members:
            p = params[n]
            shape = tuple(p.shape)
            v = torch.empty(shape, dtype=torch.float32)
            leaf = _leaf(n)
            if scheme == "normal":
                v.normal_(0.0, _sigma(p), generator=gen) if v.numel() else None
            elif len(shape) >= 2:
                torch.nn.init.kaiming_uniform_(v, a=math.sqrt(5), generator=gen)
            elif leaf == "weight":
                v.fill_(1.0)
            elif leaf == "bias" and weight is not None and weight.dim() >= 2:
                fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(
                    torch.empty(tuple(weight.shape), device="meta")
                )
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                torch.nn.init.uniform_(v, -bound, bound, generator=gen)
            elif leaf == "bias" and weight is not None and weight.dim() == 1:
                v.fill_(0.0)
            elif v.numel():
                v.normal_(0.0, _sigma(p), generator=gen)
            out[n] = v
    return out


class RandomizedModels:
    """A working copy of a model plus its randomized parameter values, for one audit.

    ``cascade()`` and ``independent()`` yield ``(step name, model)`` with the copy randomized in
    place for that step; the copy is restored when the iteration ends (also on an exception).
    The user's model is only read.
    """

    def __init__(
        self,
        model: Any,
        x: torch.Tensor,
        seed: int,
        granularity: str = "blocks",
        reinit: str = "default",
        max_steps: int | None = None,
    ):
        self.model, self.seed = model, int(seed)
        self.granularity, self.reinit = granularity, reinit
        self.key = (id(model), int(seed), x.dtype, x.device)
        self.module, self.originals = self._working_copy(model, x)
        self.params: dict[str, torch.nn.Parameter] = dict(self.module.named_parameters())
        self.steps = group_parameters(self.module, granularity, max_steps)
        self.modules = {
            step: list(dict.fromkeys(_module_of(n) or n for n in names)) for step, names in self.steps
        }
        all_names = [n for _, names in self.steps for n in names]
        values = reinit_values(self.params, all_names, self.seed, reinit)
        self.random = {
            n: values[n].to(device=p.device, dtype=p.dtype) for n, p in self.params.items() if n in values
        }

    @staticmethod
    def _working_copy(model: Any, x: torch.Tensor) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        """A deep copy of the graph the methods run (or of the module) and read-only references
        to the original parameter values."""
        from ..graph import get_graph

        module = getattr(model, "module", model)
        try:
            source = get_graph(model, x)
        except DecompositionError:
            source = None  # an eager module torch.export cannot capture: copy the module
        if source is None:
            source = module
        work = copy.deepcopy(source)
        originals = {n: p.detach() for n, p in source.named_parameters()}
        return work, originals

    def wrap(self) -> Any:
        """A fresh model object around the working copy (new identity: no stale caches)."""
        if dataclasses.is_dataclass(self.model) and not isinstance(self.model, type):
            return dataclasses.replace(self.model, module=self.module, exported=None)
        return types.SimpleNamespace(
            module=self.module, static_batch=getattr(self.model, "static_batch", None)
        )

    @torch.no_grad()
    def _set(self, names: list[str], random: bool) -> None:
        for n in names:
            src = self.random[n] if random else self.originals[n]
            self.params[n].copy_(src)

    def cascade(self) -> Iterator[tuple[str, Any]]:
        done: list[str] = []
        try:
            for step, names in self.steps:
                self._set(names, True)
                done.extend(names)
                yield step, self.wrap()
        finally:
            self._set(done, False)

    def independent(self) -> Iterator[tuple[str, Any]]:
        for step, names in self.steps:
            try:
                self._set(names, True)
                yield step, self.wrap()
            finally:
                self._set(names, False)

    def original(self) -> Any:
        """The unrandomized working copy (for tests: it must give the original maps)."""
        return self.wrap()
