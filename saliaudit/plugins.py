"""Plugins: methods and checks registered from outside the package.

A plugin is a module (``--plugin mypkg.saliency``) or a Python file (``--plugin my_method.py``)
that registers methods with :func:`register_method` and checks with :func:`register_check`
when it is imported. Installed packages can do the same through the entry-point groups
``saliaudit.methods`` and ``saliaudit.checks``: each entry point names a module (or an object
in one) that registers when loaded. A plugin's method or check is listed, audited, reported
and gated exactly like a built-in one, and the results record where it came from.

Loading a plugin runs its code, like importing any Python module: only name plugins you trust.
"""

from __future__ import annotations

import contextvars
import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError

__all__ = [
    "register_method",
    "register_check",
    "load_plugins",
    "load_entry_points",
    "loaded_plugins",
    "ENTRY_POINT_GROUPS",
]

#: Entry-point groups scanned for installed plugins.
ENTRY_POINT_GROUPS = ("saliaudit.methods", "saliaudit.checks")

_origin: contextvars.ContextVar[str] = contextvars.ContextVar("saliaudit_plugin", default="")
_loaded: dict[str, str] = {}  # spec -> module name
_entry_points_loaded: set[str] = set()


def register_method(
    name: str,
    *,
    family: str = "plugin",
    reference: str = "",
    needs_internals: bool = False,
    summary: str = "",
    reference_input: Callable[..., torch.Tensor] | None = None,
    cost: Any = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register ``fn(model, x, targets, **params) -> (B, C, H, W)`` as a method.

    Args:
        name: the method's name (``--methods NAME``); a built-in name is replaced.
        family: a label for listings (default ``plugin``); ``control`` makes it a
            model-independent control that never gates.
        reference: the paper or source, shown in the report.
        needs_internals: the method needs layer internals (skipped on TorchScript models).
        summary: one line for ``saliaudit methods`` (default: the docstring's first line).
        reference_input: for a method whose attributions should sum to ``f(x) − f(x̄)``,
            ``fn(model, x, **params) -> (K, B, C, H, W)`` giving ``x̄``; the audit then reports
            its summation-to-delta per image.
        cost: model passes of one map computation per image, a
            :class:`saliaudit.cost.Passes` or ``cost(params, (H, W)) -> Passes`` (default: one
            forward+backward row): what the audit's plan and ``--budget`` count.

    ``fn`` gets the model (``model(x)`` gives differentiable logits; the loaded model wraps the user's module),
    images ``x`` ``(B, C, H, W)`` preprocessed on the model's device and the target classes
    ``(B,)``; its keyword-only arguments with defaults are the method's parameters. It returns
    a signed attribution at input resolution, post-processed like the built-in methods
    (``--post signed,abs``: sum over channels with or without the sign).
    """
    from .methods import register

    return register(
        name,
        family=family,
        needs_internals=needs_internals,
        reference=reference,
        summary=summary,
        origin=_origin.get() or _caller_module(),
        reference_input=reference_input,
        cost=cost,
    )


def register_check(cls: type) -> type:
    """Class decorator: register a subclass of :class:`saliaudit.Check` by its ``name``.

    The class declares its metadata as class attributes (``name``, ``title``, ``metric``,
    ``thresholds``, ``params``, ...) and implements ``measure`` and ``judge``; see
    :class:`saliaudit.checks.base.Check`.
    """
    from .checks.base import Check, register

    if not (isinstance(cls, type) and issubclass(cls, Check)):
        raise TypeError("register_check decorates a subclass of saliaudit.Check")
    if not getattr(cls, "name", ""):
        raise TypeError(f"{cls.__name__} needs a class attribute 'name'")
    cls.origin = _origin.get() or cls.__module__
    return register(cls)


def _caller_module() -> str:
    frame = sys._getframe(2)
    return str(frame.f_globals.get("__name__", "plugin"))


def loaded_plugins() -> dict[str, str]:
    """The plugins loaded in this process: spec -> module name."""
    return dict(_loaded)


def load_plugins(specs: Iterable[str], *, base: Path | None = None) -> list[str]:
    """Import each plugin (a module name or a ``.py`` file, relative to ``base``) once.

    Returns the specs as loaded (files as absolute paths). Raises :class:`UsageError` with a
    one-line reason when a plugin cannot be found or fails while importing.
    """
    done = []
    for spec in specs:
        spec = str(spec).strip()
        if not spec:
            continue
        is_file = spec.endswith(".py") or "/" in spec or "\\" in spec
        if is_file:
            path = Path(spec).expanduser()
            if not path.is_absolute() and base is not None:
                path = base / path
            path = path.resolve()
            key = str(path)
            if key not in _loaded:
                _loaded[key] = _import_file(path)
        else:
            key = spec
            if key not in _loaded:
                _loaded[key] = _import_module(spec)
        done.append(key)
    return done


def _import_file(path: Path) -> str:
    if not path.is_file():
        raise UsageError(
            "plugin file not found",
            path=path,
            hint="pass --plugin with an existing .py file or an importable module",
        )
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    name = f"saliaudit_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(
            "cannot import this plugin file", path=path, hint="a plugin is a Python source file ending in .py"
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    _run(lambda: spec.loader.exec_module(module), str(path), str(path))
    return name


def _import_module(name: str) -> str:
    if importlib.util.find_spec(name.split(".")[0]) is None:
        raise UsageError(
            f"plugin module {name!r} not found",
            hint="install it, add its folder to PYTHONPATH, or pass a .py file",
        )
    _run(lambda: importlib.import_module(name), name, name)
    return name


def _run(load: Callable[[], Any], origin: str, label: str) -> None:
    token = _origin.set(origin)
    try:
        load()
    except UsageError:
        raise
    except Exception as err:
        text = str(err).strip().splitlines()
        raise UsageError(
            f"plugin {label} failed to load: {type(err).__name__}: {text[0] if text else ''}".rstrip(": "),
            hint="fix the plugin or leave it out",
        ) from err
    finally:
        _origin.reset(token)


def load_entry_points(group: str) -> None:
    """Load the installed plugins of one entry-point group (once per process)."""
    if group in _entry_points_loaded:
        return
    _entry_points_loaded.add(group)
    for ep in importlib.metadata.entry_points(group=group):
        dist = getattr(ep.dist, "name", None) or ep.value
        _run(ep.load, f"{dist} ({ep.name})", f"{ep.name} from {dist} ({group})")
