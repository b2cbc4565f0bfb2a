"""Validated audit settings, each with the source it came from (see docs/usage.md, "Configuration").

Precedence: command-line flags > ``SALIAUDIT_*`` environment variables > ``--config FILE``
or the nearest ``saliaudit.toml`` / ``[tool.saliaudit]`` in ``pyproject.toml`` (searched from
the current folder upwards) > defaults. The report and the results record the effective
value of every setting and where it came from.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (requires-python >= 3.10): the same parser, as a package
    import tomli as tomllib

from . import validate
from .errors import SaliauditError, UsageError, suggest
from .psi import PSI_PRESETS

__all__ = ["Setting", "SETTINGS", "AuditConfig", "resolve_config", "find_config_file"]

FORMATS = ("html", "pdf", "json", "junit")  # renderers of report/ (render.FILES)
FAIL_ON = ("fail", "warn", "never")
#: ``overlays``: JPEG overlays for the report's example images, every image, or none.
OVERLAYS = ("examples", "all", "none")
#: Methods audited by default: FullGrad, the comparison methods auditors know, the controls.
DEFAULT_METHODS = (
    "fullgrad",
    "gradient",
    "grad_x_input",
    "integrated_gradients",
    "smoothgrad",
    "gradcam",
    "gradcam_pp",
    "guided_backprop",
    "deeplift",
    "random",
    "edge",
    "edge_signed",
)
#: Command-line spellings that differ from the setting name.
_FLAG_NAMES = {
    "thresholds": "--threshold",
    "check_params": "--check-param",
    "method_params": "--method-param",
    "plugins": "--plugin",
}
#: Settings that only the user's own command line or environment may set (never a file).
FLAG_OR_ENV_ONLY = ("trust_model",)


def _parsed(v: Any, convert: Callable[[str], Any]) -> Any:
    """Text (flags, environment) converted with ``convert``; other values (TOML) as they are.
    Text that does not convert is returned unchanged, for :mod:`.validate` to reject."""
    if not isinstance(v, str):
        return v
    try:
        return convert(v.strip())
    except ValueError:
        return v


def _reworded(check: Callable[[Any], Any], v: Any) -> Any:
    """``check(v)`` with an :class:`~.validate.InvalidValue` turned into the ``ValueError``
    that :func:`resolve_config` prefixes with the flag, variable or file entry."""
    try:
        return check(v)
    except validate.InvalidValue as err:
        raise ValueError(f"expected {err.expected}, got {v!r}") from None


def _int(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    return lambda v: _reworded(lambda raw: validate.integer("value", _parsed(raw, int), min=lo, max=hi), v)


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None or str(v).strip().lower() in ("", "none") else parse(v)


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        word = str(v).strip().lower()
        if word not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {v!r}{suggest(word, choices)}")
        return word

    return parse


def _list_of(*choices: str) -> Callable[[Any], list[str]]:
    def parse(v: Any) -> list[str]:
        items = v if isinstance(v, (list, tuple)) else str(v).split(",")
        out = [str(i).strip() for i in items if str(i).strip()]
        bad = [i for i in out if i not in choices]
        if bad or not out:
            hint = suggest(bad[0], choices) if bad else ""
            raise ValueError(f"expected a comma-separated list of {', '.join(choices)}, got {v!r}{hint}")
        return list(dict.fromkeys(out))

    return parse


def _model_option(name: str) -> Callable[[Any], Any]:
    """``input_size``, ``mean``, ``std``: checked as the model loader will parse them (so a bad
    value fails before anything is written), kept as given."""

    def parse(v: Any) -> Any:
        from .model_formats import parse_size, parse_triple

        try:
            parse_size(v) if name == "input_size" else parse_triple(v, name)
        except SaliauditError as err:
            text = str(err).removesuffix(f" ({err.hint})") if err.hint else str(err)
            detail = text.split(": ", 1)[-1]
            raise ValueError(f"{detail}, got {v!r}" + (f" ({err.hint})" if err.hint else "")) from None
        return v

    return _optional(parse)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def _overlays(v: Any) -> str:
    """``examples``, ``all`` or ``none``; the former booleans still mean on (``examples``,
    the default) and off (``none``)."""
    if isinstance(v, str) and v.strip().lower() in OVERLAYS:
        return v.strip().lower()
    try:
        return "examples" if _bool(v) else "none"
    except ValueError:
        word = str(v).strip().lower()
        raise ValueError(
            f"expected one of {', '.join(OVERLAYS)} (or true/false), got {v!r}{suggest(word, OVERLAYS)}"
        ) from None


def _text(v: Any) -> str:
    return str(v)


@dataclass(frozen=True)
class Setting:
    """One configurable value: its parser, default and help text (the command line's help
    shows both, so help and behaviour cannot drift). ``shown`` describes a default that is
    not a plain value (``None`` meaning "automatic", "all", ...)."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    shown: str | None = None

    def default_text(self) -> str:
        """The default as ``--help`` shows it: ``html,pdf,json``, ``8``, ``on``, ``automatic``."""
        if self.shown is not None:
            return self.shown
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if isinstance(self.default, (list, tuple)):
            return ", ".join(map(str, self.default)) or "none"
        return "none" if self.default is None else str(self.default)


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        # first: plugins register the methods and checks that later settings may name
        Setting(
            "plugins",
            lambda v: _plugins(v),
            [],
            "module or .py file that registers methods or checks (repeatable; runs its code)",
        ),
        Setting("output", _text, "saliaudit-report", "output folder"),
        Setting(
            "format",
            _list_of(*FORMATS),
            ["html", "pdf", "json"],
            "comma-separated output formats: " + ", ".join(FORMATS),
        ),
        Setting(
            "psi", _list_of(*PSI_PRESETS), list(PSI_PRESETS), "comma-separated FullGrad post-processings ψ"
        ),
        Setting(
            "methods",
            lambda v: _methods(v),
            list(DEFAULT_METHODS),
            "comma-separated saliency methods (saliaudit methods)",
        ),
        Setting(
            "post",
            _list_of("signed", "abs"),
            ["signed", "abs"],
            "post-processings of the comparison methods: signed, abs",
        ),
        Setting("cam_layer", _optional(_text), None, "layer of the CAM methods", "automatic"),
        Setting("max_images", _optional(_int(1)), None, "audit at most N images", "all"),
        Setting("sample", _optional(_int(1)), None, "audit a reproducible random subset of N images", "all"),
        Setting("batch_size", _int(1, 4096), 8, "images per forward/backward batch"),
        Setting(
            "profile",
            _choice("quick", "standard", "thorough"),
            "standard",
            "images, steps and perturbations of the expensive checks: quick, standard or thorough",
        ),
        Setting(
            "budget",
            _optional(lambda v: _duration(v)),
            None,
            "fit the audit into this time, e.g. 10m or 90s (the expensive checks measure fewer "
            "images; the report says what was reduced)",
            "none",
        ),
        Setting("seed", _int(0, 2**64 - 1), 0, "seed for every random choice"),
        Setting("device", _text, "auto", "device: auto, cpu, cuda, cuda:N or mps"),
        Setting(
            "fail_on",
            _choice(*FAIL_ON),
            "fail",
            "lowest verdict that makes the exit code 1: fail, warn, never",
        ),
        Setting(
            "max_skipped",
            lambda v: _fraction(v),
            0.1,
            "largest fraction of the images that may be dropped (undecodable, or NaN/Inf logits) "
            "before the gate fails, 0 to 1",
        ),
        Setting(
            "arch",
            _optional(_text),
            None,
            "architecture of a state_dict: a torchvision model name, or timm:NAME for a timm model",
        ),
        Setting(
            "num_classes",
            _optional(_int(1)),
            None,
            "number of classes of a state_dict head",
            "from the weights",
        ),
        Setting(
            "input_size",
            _model_option("input_size"),
            None,
            "model input size, H or H,W",
            "from the model, else 224",
        ),
        Setting(
            "mean",
            _model_option("mean"),
            None,
            "normalization mean, three comma-separated values",
            "from the model, else ImageNet's",
        ),
        Setting(
            "std",
            _model_option("std"),
            None,
            "normalization std, three comma-separated values",
            "from the model, else ImageNet's",
        ),
        Setting("labels", _optional(_text), None, "class names file, one per line", "from the model"),
        Setting(
            "output_key",
            _optional(_text),
            None,
            "which part of a model output that is a tuple, list, dict or dataclass holds the logits: "
            "a key, attribute name or index",
            "the logits entry, else the only (batch, classes) tensor",
        ),
        Setting(
            "trust_model", _bool, False, "allow unpickling a pickled nn.Module (runs code from the file)"
        ),
        Setting("max_pixels", _int(1), 64_000_000, "refuse images with more pixels (decompression bombs)"),
        Setting(
            "completeness_tolerance",
            lambda v: _positive_float(v),
            1e-3,
            "FAIL completeness when a relative residual exceeds this (config file or environment only)",
        ),
        Setting(
            "checks",
            _optional(lambda v: _checks(v)),
            None,
            "comma-separated sanity checks to run (saliaudit checks)",
            "all",
        ),
        Setting(
            "thresholds",
            lambda v: _check_options(v, "thresholds"),
            {},
            "check threshold CHECK.NAME=VALUE, e.g. class_sensitivity.fail=0.8 (repeatable)",
            "those of saliaudit checks",
        ),
        Setting(
            "check_params",
            lambda v: _check_options(v, "params"),
            {},
            "check parameter CHECK.NAME=VALUE, e.g. randomization.granularity=layers (repeatable)",
            "those of saliaudit checks",
        ),
        Setting(
            "method_params",
            lambda v: _method_options(v),
            {},
            "method parameter METHOD.NAME=VALUE, e.g. integrated_gradients.steps=64 (repeatable)",
            "those of saliaudit methods",
        ),
        Setting(
            "flip",
            _optional(lambda v: _flip(v)),
            None,
            "class pairs C:C' (indices or names) of sign_flip, e.g. 8:3",
            "top-1 vs runner-up",
        ),
        Setting(
            "masks",
            _optional(_text),
            None,
            "folder of object masks MASKS/<image path without extension>/<class>.png (pointing games)",
            "none",
        ),
        Setting(
            "overlays",
            _overlays,
            "examples",
            "JPEG overlays in maps/: examples (the report's example images), all (every image "
            "and map) or none",
        ),
        Setting(
            "force",
            _bool,
            False,
            "write into a non-empty folder that is not a saliaudit output; files saliaudit did not "
            "write are never overwritten",
        ),
        Setting("examples", _int(0, 1000), 6, "example images per check in the PDF, most telling first"),
        Setting("examples_html", _int(0, 1000), 24, "example images per check in the HTML"),
        Setting("page_size", _choice("a4", "letter"), "a4", "PDF page size: a4 or letter"),
        Setting(
            "annotations",
            _bool,
            False,
            "print ::error::/::warning:: annotations for GitHub Actions on stdout",
        ),
    ]
}


def _duration(v: Any) -> float:
    from .plan import parse_duration

    return parse_duration(v)


def _plugins(v: Any) -> list[str]:
    items = v if isinstance(v, (list, tuple)) else str(v).split(",")
    return [str(i).strip() for i in items if str(i).strip()]


def _methods(v: Any) -> list[str]:
    from .methods import method_names

    return _list_of(*method_names())(v)


def _checks(v: Any) -> list[str]:
    from .checks import check_names

    return _list_of(*check_names())(v)


def _flip(v: Any) -> list[list[str]]:
    """``8:3`` or ``8:3,cat:dog`` -> ``[["8", "3"], ["cat", "dog"]]`` (resolved to classes later)."""
    items = v if isinstance(v, (list, tuple)) else str(v).split(",")
    pairs = []
    for item in items:
        pair = [str(p).strip() for p in (item if isinstance(item, (list, tuple)) else str(item).split(":"))]
        if len(pair) != 2 or not all(pair) or pair[0] == pair[1]:
            raise ValueError(f"expected class pairs C:C' such as 8:3, got {v!r}")
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"expected class pairs C:C' such as 8:3, got {v!r}")
    return pairs


def _scalar(text: Any, default: Any) -> Any:
    """Parse a check option to the type of its default (numbers, booleans, lists, text)."""
    if not isinstance(text, str):
        value = text
    else:
        t = text.strip()
        low = t.lower()
        if low in ("none", "null", ""):
            return None
        if isinstance(default, bool):
            return _bool(t)
        if isinstance(default, list) or t.startswith("["):
            t = t.strip("[]")
            return (
                [
                    _scalar(p, default[0] if isinstance(default, list) and default else 0.0)
                    for p in t.replace(";", " ").split()
                    if p
                ]
                if t
                else []
            )
        try:
            value = float(t) if any(c in low for c in ".e") or not low.lstrip("-").isdigit() else int(t)
        except ValueError:
            value = t
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {text!r}")
        if isinstance(value, float) and value != value:
            raise ValueError(f"expected a number, got {text!r}")
    return value


def _option_items(v: Any, what: str) -> list[tuple[str, Any]]:
    """``a.b=1,c.d=x`` (flags, environment) or ``{a: {b: value}}`` (config file) as
    ``[("a.b", value), ...]``."""
    if isinstance(v, dict):
        return [
            (f"{c}.{k}", val)
            for c, sub in v.items()
            for k, val in (sub.items() if isinstance(sub, dict) else [(None, sub)])
        ]
    raw = v if isinstance(v, (list, tuple)) else [v]
    items = []
    for chunk in raw:
        for part in str(chunk).split(","):
            if part.strip():
                key, sep, val = part.partition("=")
                if not sep:
                    raise ValueError(f"expected {what}.NAME=VALUE, got {part.strip()!r}")
                items.append((key.strip(), val.strip()))
    return items


def _split_key(key: Any, what: str, names: list[str]) -> tuple[str, str]:
    """``"CHECK.NAME"`` -> ``(check, name)``, the first part one of ``names``."""
    owner, dot, name = str(key).partition(".")
    if not dot or owner not in names or not name or name == "None":
        raise ValueError(
            f"expected {what}.NAME=VALUE with {what} one of {', '.join(names)}, got {key!r}"
            + (suggest(owner, names) if owner not in names else "")
        )
    return owner, name


def _unknown_name(owner_kind: str, owner: str, kind: str, name: str, defaults: Mapping[str, Any]) -> str:
    return f"{owner_kind} {owner} has no {kind} {name!r} (it has: {', '.join(defaults) or 'none'})" + suggest(
        name, defaults
    )


def _check_options(v: Any, kind: str) -> dict[str, dict[str, Any]]:
    """``a.b=1,c.d=x`` (flags, environment) or ``{check: {name: value}}`` (config file)."""
    from .checks import check_names, get_check

    out: dict[str, dict[str, Any]] = {}
    for key, val in _option_items(v, "CHECK"):
        check, name = _split_key(key, "CHECK", check_names())
        defaults = getattr(get_check(check), kind)
        if name not in defaults:
            raise ValueError(_unknown_name("check", check, kind[:-1], name, defaults))
        default = defaults[name]
        if kind == "thresholds" and default is None:
            default = 0.0
        out.setdefault(check, {})[name] = _scalar(val, default)
    return out


def _method_options(v: Any) -> dict[str, dict[str, Any]]:
    """``integrated_gradients.steps=64`` (flags, environment) or ``{method: {name: value}}``
    (config file): values of the parameters ``saliaudit methods`` lists, of their default's type."""
    from .methods import METHODS, method_names

    out: dict[str, dict[str, Any]] = {}
    for key, val in _option_items(v, "METHOD"):
        method, name = _split_key(key, "METHOD", method_names())
        defaults = METHODS[method].params
        if name not in defaults:
            raise ValueError(_unknown_name("method", method, "parameter", name, defaults))
        default = defaults[name]
        if isinstance(default, str) and isinstance(val, str):
            value: Any = val.strip()
        else:
            value = _scalar(val, default)
            if type(default) is int and type(value) is not int:
                raise ValueError(f"{method}.{name}: expected an integer, got {val!r}")
        out.setdefault(method, {})[name] = value
    return out


def _fraction(v: Any) -> float:
    return _reworded(lambda raw: validate.number("value", _parsed(raw, float), min=0, max=1), v)


def _positive_float(v: Any) -> float:
    return _reworded(lambda raw: validate.number("value", _parsed(raw, float), min=0, min_open=True), v)


@dataclass
class AuditConfig:
    """Effective settings (``values``) and where each came from (``sources``)."""

    values: dict[str, Any]
    sources: dict[str, str]
    config_file: Path | None = None

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)


def find_config_file(start: Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The nearest ``saliaudit.toml`` or ``pyproject.toml`` with ``[tool.saliaudit]``."""
    folder = (start or Path.cwd()).resolve()
    for d in [folder, *folder.parents]:
        candidate = d / "saliaudit.toml"
        if candidate.is_file():
            return candidate, _read_toml(candidate, table=None)
        pyproject = d / "pyproject.toml"
        if pyproject.is_file():
            table = _read_toml(pyproject, table=("tool", "saliaudit"))
            if table is not None:
                return pyproject, table
    return None


def _read_toml(path: Path, table: tuple[str, ...] | None) -> dict[str, Any] | None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UsageError(
            f"cannot read the configuration: {err}",
            path=path,
            hint="fix the TOML syntax or pass another --config",
        ) from None
    if table is None:
        return data.get("saliaudit", data) if isinstance(data.get("saliaudit"), dict) else data
    for key in table:
        data = data.get(key) if isinstance(data, dict) else None
        if data is None:
            return None
    return data


def _normalize_key(key: str) -> str:
    return key.strip().lower().replace("-", "_")


def resolve_config(
    flags: Mapping[str, Any],
    *,
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> AuditConfig:
    """Merge flags, environment, config file and defaults; validate every value.

    Args:
        flags: values given on the command line (``None`` = not given).
        config_file: ``--config FILE``; without it the nearest config file is used.
        environ: environment (default ``os.environ``); ``SALIAUDIT_BATCH_SIZE=4`` sets
            ``batch_size``.
        cwd: where to start looking for a config file.

    Raises:
        UsageError: an unknown key or an invalid value, naming where it came from.
    """
    environ = os.environ if environ is None else environ
    file_values: dict[str, Any] = {}
    file_path: Path | None = None
    if config_file is not None:
        file_path = Path(config_file)
        if not file_path.is_file():
            raise UsageError("configuration file not found", path=file_path, hint="check the --config path")
        table = _read_toml(
            file_path, table=("tool", "saliaudit") if file_path.name == "pyproject.toml" else None
        )
        file_values = table or {}
    else:
        found = find_config_file(cwd)
        if found is not None:
            file_path, file_values = found
    layers: list[tuple[str, dict[str, Any]]] = [
        ("flag", {k: v for k, v in flags.items() if v is not None}),
        (
            "environment",
            {
                _normalize_key(k[len("SALIAUDIT_") :]): v
                for k, v in environ.items()
                if k.startswith("SALIAUDIT_")
            },
        ),
        (
            f"config file {file_path}" if file_path else "config file",
            {_normalize_key(k): v for k, v in file_values.items()},
        ),
    ]
    for source, layer in layers[1:]:
        unknown = sorted(set(layer) - set(SETTINGS))
        if unknown:
            if source == "environment":
                what = f"environment variable SALIAUDIT_{unknown[0].upper()}"
                close = suggest(what.split()[-1], [f"SALIAUDIT_{k.upper()}" for k in SETTINGS])
            else:
                what = f"setting {unknown[0]} in {source}"
                close = suggest(unknown[0], SETTINGS)
            raise UsageError(f"unknown {what}{close}", hint="valid settings: " + ", ".join(SETTINGS))
        if source != "environment" and any(k in layer for k in FLAG_OR_ENV_ONLY):
            key = next(k for k in FLAG_OR_ENV_ONLY if k in layer)
            raise UsageError(
                f"{key} is not accepted in {source}: a configuration file found in a parent "
                "folder must not enable running code from a model file",
                hint=f"pass --{key.replace('_', '-')} on the command line instead",
            )
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, setting in SETTINGS.items():
        raw, source = setting.default, "default"
        for layer_source, layer in layers:
            if name in layer:
                raw, source = layer[name], layer_source
                break
        try:
            values[name] = setting.parse(raw) if source != "default" else copy.deepcopy(raw)
        except ValueError as err:
            label = {
                "flag": _FLAG_NAMES.get(name, f"--{name.replace('_', '-')}"),
                "environment": f"SALIAUDIT_{name.upper()}",
            }.get(source, f"{name} in {source}")
            raise UsageError(f"invalid {label}: {err}") from None
        sources[name] = source
        if name == "plugins" and values[name]:
            from .plugins import load_plugins

            base = file_path.parent if source.startswith("config file") and file_path else None
            values[name] = load_plugins(values[name], base=base)
    return AuditConfig(values, sources, file_path)
