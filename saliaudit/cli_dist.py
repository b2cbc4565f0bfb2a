"""``saliaudit report`` under torchrun (saliaudit/distributed.py): joining the job, the
ranks other than 0, and how rank 0 ends a job that did not finish."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .cli_common import Interrupted, err_console
from .errors import EXIT_INTERRUPTED, EXIT_OK, ResumeRefusedError, SaliauditError

if TYPE_CHECKING:
    from .config import AuditConfig
    from .distributed import World
    from .report.output import OutputFolder

__all__ = ["join", "worker", "stopped"]


def join(world: World, cfg: AuditConfig, resume: bool) -> AuditConfig:
    """Join the torchrun job: the configuration with this rank's device (``--resume`` is
    refused: resume an interrupted audit in one process)."""
    from . import distributed

    if resume:
        raise ResumeRefusedError(
            "--resume is not supported under torchrun",
            hint="resume the interrupted audit in one process, or rerun the job without --resume",
        )
    return distributed.start(world, cfg)


def worker(model: Path, images: Path, cfg: AuditConfig, world: World) -> int:
    """A torchrun rank other than 0: its share of the units, sent to rank 0; no output, no
    files (it starts once rank 0 has prepared the output folder). The exit code."""
    from . import distributed

    try:
        code = distributed.share()
        if code is not None:  # rank 0 could not prepare the output folder (it says why)
            return int(code)
        distributed.run_sharded(model, images, cfg, Path(cfg.output), world)
    except SaliauditError as err:
        return err.exit_code  # rank 0 prints the message
    except (KeyboardInterrupt, Interrupted):
        return EXIT_INTERRUPTED
    finally:
        distributed.stop()
    return EXIT_OK


def stopped(out: OutputFolder, reason: str | None = None) -> None:
    """Rank 0 of a torchrun job that did not finish: the overlays it wrote are removed and
    no results are written (a partial audit of some ranks would mislead)."""
    if out.prepared:
        out.discard("maps")
        out.finish()
    if reason is not None:
        err_console.print(f"saliaudit: {reason}; nothing was written", markup=False, soft_wrap=True)
