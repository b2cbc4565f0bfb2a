"""Errors raised by saliaudit.

Every error carries a one-line message that names the file involved and says what to do,
and the exit code the CLI maps it to (docs/report.md, "Exit codes"). The rule:

* 2, usage: what the user typed cannot be acted on: an unknown option, command or name, an
  invalid value or config entry (or environment setting such as ``SOURCE_DATE_EPOCH``), a
  path the user named that does not exist or is of the wrong
  kind (a folder for a file), or a flag the input needs (a state_dict without ``--arch``, a
  pickled model without ``--trust-model``). Nothing is written.
* 3, cannot run: the named files exist but the audit cannot be done with them: a model that
  does not load or does not behave like a classifier, an unusable output folder (not
  writable, in use by another run, too little free space, a file saliaudit did not write
  where it would write), a missing PDF backend or optional package (timm, transformers), an
  internal error.
* 4, no usable images: IMAGES (or explain's IMAGE) exists, but no image in it can be decoded.

The command line (``cli.py`` and its ``cli_*`` modules) is the only place that catches them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

EXIT_OK = 0
EXIT_GATE = 1
EXIT_USAGE = 2
EXIT_CANNOT_RUN = 3
EXIT_NO_IMAGES = 4
EXIT_NO_VERDICT = 5  # the audit ran, but no check judged any method: nothing to gate on
EXIT_INTERRUPTED = 130


class SaliauditError(Exception):
    """Base class. ``str(err)`` is the one-line message shown to the user."""

    exit_code: int = EXIT_CANNOT_RUN

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.hint = hint
        text = f"{self.path}: {message}" if self.path else message
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)


class UsageError(SaliauditError):
    """A flag, option value or config entry is invalid (exit 2)."""

    exit_code = EXIT_USAGE


class ResumeRefusedError(UsageError):
    """``--resume`` cannot continue the saved audit (nothing saved, or it differs): exit 2,
    and the output folder is left as it was."""


class ModelLoadError(SaliauditError):
    """The model file cannot be loaded or does not behave like a classifier (exit 3)."""

    exit_code = EXIT_CANNOT_RUN


class UntrustedPickleError(ModelLoadError):
    """A pickled model was refused because unpickling can run arbitrary code: it needs
    ``--trust-model``, a usage error (exit 2) like a state_dict without ``--arch``."""

    exit_code = EXIT_USAGE


class ImageError(SaliauditError):
    """One image cannot be used; the audit records it as skipped and goes on."""


class NoImagesError(SaliauditError):
    """No usable image was found (exit 4)."""

    exit_code = EXIT_NO_IMAGES


class DecompositionError(SaliauditError):
    """A saliency decomposition cannot be computed for this model (exit 3 when fatal)."""


class NotApplicableError(DecompositionError):
    """A method has no rule for an op of this model (a propagation method on attention, for
    instance): the audit reports the method SKIPPED with the message; exit 3 when fatal
    (``saliaudit explain``)."""


class ImputationError(SaliauditError):
    """ROAD's linear imputation cannot fill a mask (no kept pixel, or no convergence): the
    cell becomes ERROR (exit 3 only if raised outside a check)."""


class OutputError(SaliauditError):
    """The output folder cannot be written safely: not writable, locked by another run, too
    little free space, or a file saliaudit did not write where it would write (exit 3)."""


def suggest(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to a misspelled ``word``
    (empty when none is close): appended to usage errors about names."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
