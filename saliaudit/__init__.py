"""saliaudit: audit whether the saliency maps of a PyTorch image classifier can be trusted.

The public API (everything else may change between versions):

- :func:`load_model` loads a classifier as the CLI does (``.pt2``, state_dict + ``arch``,
  TorchScript, trusted pickles) and wraps it with its preprocessing.
- :func:`full_gradients` computes the complete FullGrad decomposition (Srinivas & Fleuret,
  NeurIPS 2019); :func:`explain` any registered method's signed attribution.
- :func:`audit` runs a whole audit and returns its :class:`~saliaudit.result.AuditResult`;
  :func:`render` writes HTML/PDF/JSON/JUnit from results.
- :func:`register_method`, :func:`register_check` and :class:`Check` extend saliaudit with
  methods and checks that are audited, reported and gated like the built-in ones.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from .checks.base import Check  # noqa: E402
from .errors import SaliauditError  # noqa: E402
from .methods import explain  # noqa: E402
from .methods.fullgrad import FullGradients, full_gradients  # noqa: E402
from .model import LoadedModel, load_model  # noqa: E402
from .plugins import register_check, register_method  # noqa: E402
from .result import AuditResult  # noqa: E402

__all__ = [
    "__version__",
    "SaliauditError",
    "FullGradients",
    "LoadedModel",
    "AuditResult",
    "Check",
    "full_gradients",
    "load_model",
    "explain",
    "audit",
    "render",
    "register_method",
    "register_check",
]


def audit(
    model: str | Path,
    images: str | Path,
    *,
    output: str | Path | None = None,
    config: str | Path | None = None,
    **settings: Any,
) -> AuditResult:
    """Audit ``model`` on ``images`` as ``saliaudit report`` does; the results object.

    Args:
        model: the model file (any format ``saliaudit report`` accepts).
        images: an image folder or a list file.
        output: folder for the JPEG overlays (default ``None``: no overlays, nothing written).
            Write the reports with :func:`render`. The folder is used as ``saliaudit report``
            uses it (docs/usage.md, "The output folder"): locked while the audit runs, a
            non-empty folder that saliaudit did not write needs ``force=True``, and a file
            saliaudit did not write is never overwritten; nothing is removed.
        config: a TOML configuration file (default: the nearest ``saliaudit.toml`` or
            ``[tool.saliaudit]`` as for the CLI).
        **settings: any setting of the configuration by name, e.g. ``methods=["fullgrad",
            "gradient"]``, ``checks=["class_sensitivity"]``, ``max_images=8``, ``seed=0``;
            they take precedence like command-line flags.

    Returns:
        :class:`~saliaudit.result.AuditResult`; ``result.to_dict()`` is the ``results.json``
        document and ``result.summary["gate_failed"]`` the gate.

    Raises:
        SaliauditError: an invalid setting, an unusable model or no usable image.
    """
    import tempfile

    from .config import resolve_config
    from .engine import run_audit

    flags = {k: v for k, v in settings.items() if v is not None}
    if output is None:
        flags.setdefault("overlays", "none")
    cfg = resolve_config(flags, config_file=config)
    if output is not None:
        from .report.output import OutputFolder, Planned

        with OutputFolder(Path(output), force=cfg.force) as out:
            out.prepare(Planned(maps=cfg.overlays != "none"))
            return run_audit(model, images, cfg, out.path)
    with tempfile.TemporaryDirectory(prefix="saliaudit-") as tmp:
        return run_audit(model, images, cfg, Path(tmp))


def render(
    results: AuditResult | dict[str, Any] | str | Path,
    output: str | Path,
    *,
    formats: tuple[str, ...] | list[str] = ("html", "pdf", "json"),
    force: bool = False,
) -> list[Path]:
    """Write reports of ``results`` (an :class:`AuditResult`, its dict, or a ``results.json``
    path) to the folder ``output`` in ``formats`` (``html``, ``pdf``, ``json``, ``junit``);
    the files written. The folder is created; an existing folder that saliaudit did not
    write is refused unless ``force``."""
    from .report.output import FILES, OutputFolder, Planned
    from .report.render import load_results, write_outputs

    if isinstance(results, (str, Path)):
        results = load_results(Path(results))
    doc = results.to_dict() if isinstance(results, AuditResult) else dict(results)
    with OutputFolder(Path(output), force=force) as out:
        out.prepare(Planned(files=[FILES[f] for f in formats if f in FILES]))
        return write_outputs(doc, out.path, list(formats))
