"""One audit over several processes launched by ``torchrun`` (README, "Scaling out").

Every rank plans the same audit (same listing, samples and seed) and predicts every batch
(one forward pass per image: the per-check image counts, the example images and the image
records are the same on every rank), but computes the methods' maps and the checks only for
the batches it owns: batch ``k`` (1-based) belongs to rank ``(k - 1) % world_size``, so the
batches are dealt out in turn and no two ranks' shares differ by more than one batch. Each
finished (batch, method) unit is recorded as :func:`saliaudit.resume.unit_record` does for
``--resume``; at the end rank 0 gathers the ranks' units and replays them in batch order
exactly as a resumed audit replays its saved units, then judges and writes one report. The
results equal a single process's up to the order of floating-point sums.

Only rank 0 prints progress and writes files; the other ranks write their overlays into a
temporary folder and send the bytes with their units. A rank that raises sends rank 0 a
message naming the rank and the batch's first image, and the job stops with exit code 3.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import SaliauditError, UsageError

if TYPE_CHECKING:
    from .config import AuditConfig
    from .engine import Audit, Progress
    from .result import AuditResult

__all__ = ["World", "Shard", "DistributedError", "current_world", "owner", "partition", "run_sharded"]

#: Test hook, ``RANK:kill`` or ``RANK:raise``: that rank kills itself (SIGKILL) or raises when
#: it starts its second batch (tests/test_distributed.py).
FAULT_HOOK = "_SALIAUDIT_TEST_RANK_FAULT"


class DistributedError(SaliauditError):
    """A rank of a torchrun audit failed; the message names the rank and its image."""

    exit_code = 3


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job."""

    rank: int
    size: int
    local_rank: int


def current_world() -> World | None:
    """The torchrun job this process belongs to (``WORLD_SIZE`` > 1), else ``None``."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return None
    rank = int(os.environ.get("RANK", "0"))
    return World(rank, size, int(os.environ.get("LOCAL_RANK", str(rank))))


def owner(batch_no: int, size: int) -> int:
    """The rank that computes batch ``batch_no`` (1-based): the batches are dealt in turn."""
    return (batch_no - 1) % size


def partition(n_images: int, batch_size: int, size: int) -> list[list[int]]:
    """The image indices (in listing order) each rank measures: with every image decodable,
    batch ``k`` holds images ``(k-1)·batch_size …`` and goes to :func:`owner`."""
    shares: list[list[int]] = [[] for _ in range(size)]
    bs = max(int(batch_size), 1)
    for start in range(0, n_images, bs):
        shares[owner(start // bs + 1, size)].extend(range(start, min(start + bs, n_images)))
    return shares


def start(world: World, cfg: AuditConfig) -> AuditConfig:
    """Join the process group (nccl on GPUs, gloo on CPU); the configuration with this
    rank's device (``cuda:LOCAL_RANK`` when GPUs are present and not ``--device cpu``)."""
    import torch.distributed as dist

    asked = str(cfg.values.get("device") or "auto").lower()
    gpu = torch.cuda.is_available() and asked not in ("cpu", "mps")
    device = f"cuda:{world.local_rank}" if gpu else asked
    if gpu:
        torch.cuda.set_device(world.local_rank)
    if cfg.values.get("budget") is not None:
        raise UsageError(
            "--budget is not supported under torchrun (each rank would plan its own reductions)",
            hint="run without --budget, or in one process",
        )
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo")
    return replace(cfg, values={**cfg.values, "device": device})


def share(value: Any = None) -> Any:
    """Rank 0's ``value`` on every rank (the others wait for it): whether rank 0 prepared the
    output folder, before the others start (``None``) or its exit code when it could not."""
    import torch.distributed as dist

    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def stop() -> None:
    """Wait for every rank (rank 0 has printed its message by then: a failed rank's exit
    code does not make torchrun stop it first) and leave the process group."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a rank is gone: torchrun stops the job
            pass
        finally:
            dist.destroy_process_group()


def _store() -> Any:
    """The job's key-value store (torchrun's rendezvous), or ``None``."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # a private helper: without it the positions are not shared
        return None


def _post(world: World, where: str) -> None:
    """Publish where this rank is (``""``: its share is finished), for rank 0's message
    when torchrun stops the job because a rank was killed."""
    store = _store()
    if store is not None:
        try:
            store.set(f"saliaudit/at/{world.rank}", where)
        except Exception:  # informational only
            pass


def unfinished(world: World) -> list[str]:
    """``rank R on IMAGE`` for each other rank that had not finished its share."""
    from datetime import timedelta

    store, out = _store(), []
    if store is None:
        return out
    try:
        store.set_timeout(timedelta(seconds=2))
        for r in range(1, world.size):
            key = f"saliaudit/at/{r}"
            if store.check([key]):
                where = store.get(key).decode()
                if where:
                    out.append(f"rank {r} on {where}")
    except Exception:  # the store is gone with the job: no positions
        pass
    return out


class Shard:
    """The engine's view of this rank's share: which batches it computes (:meth:`owns`),
    the units it finished (:meth:`keep`), and on rank 0's replay the gathered units
    (:meth:`take`)."""

    def __init__(self, world: World, pool: dict[tuple[int, str], dict[str, Any]] | None = None):
        self.world, self.pool = world, pool
        self.units: dict[tuple[int, str], dict[str, Any]] = {}
        self.images: set[str] = set()
        self.where = "planning"
        self.batches = 0

    def at(self, batch_no: int, images: list[str]) -> None:
        """The audit starts batch ``batch_no`` (for a fault's message; the kill test hook)."""
        self.where = images[0] if images else f"batch {batch_no}"
        if self.pool is None and self.owns(batch_no):
            self.batches += 1
            _post(self.world, self.where)
            hook = os.environ.get(FAULT_HOOK, "")
            if self.batches == 2 and hook == f"{self.world.rank}:kill":
                os.kill(os.getpid(), 9)
            if self.batches == 2 and hook == f"{self.world.rank}:raise":
                raise RuntimeError("test fault")

    def owns(self, batch_no: int) -> bool:
        return self.pool is None and owner(batch_no, self.world.size) == self.world.rank

    def keep(self, unit: dict[str, Any], out_dir: Path) -> None:
        """A finished unit; on ranks other than 0, with its overlays' bytes."""
        if self.world.rank != 0:
            from .state_codec import decode

            unit["files"] = {
                rec.path: (Path(out_dir) / rec.path).read_bytes() for rec in decode(unit["overlays"])
            }
        self.images.update(unit["images"])
        self.units[(int(unit["batch"]), str(unit["method"]))] = unit

    def take(self, batch_no: int, method: str, images: list[str]) -> dict[str, Any] | None:
        """Rank 0's replay: the unit the owning rank computed."""
        if self.pool is None:
            return None
        unit = self.pool.get((batch_no, method))
        if unit is None or unit["images"] != list(images):
            raise DistributedError(
                f"rank {owner(batch_no, self.world.size)} sent no matching unit for batch {batch_no} "
                f"× {method} (the ranks planned different audits)",
                hint="give every rank the same files, settings and library versions",
            )
        return unit


def _gather(report: dict[str, Any], world: World) -> list[dict[str, Any]] | None:
    import torch.distributed as dist

    out: list[Any] | None = [None] * world.size if world.rank == 0 else None
    dist.gather_object(report, out, dst=0)
    return out


def run_sharded(
    model: str | Path,
    images: str | Path,
    cfg: AuditConfig,
    out_dir: Path,
    world: World,
    *,
    progress: Progress | None = None,
    result: AuditResult | None = None,
    on_plan: Any = None,
) -> Audit | None:
    """This rank's share of the audit; on rank 0 the gathered, replayed and judged audit
    (``result`` filled), on the others ``None``. Raises :class:`DistributedError` on rank 0
    when a rank failed (on that rank too, after sending its message)."""
    from .batches import first_line
    from .cost import release_memory
    from .engine import Audit
    from .report.output import atomic_write

    t0 = time.perf_counter()
    shard = Shard(world)
    work = Path(out_dir) if world.rank == 0 else Path(tempfile.mkdtemp(prefix=f"saliaudit-rank{world.rank}-"))
    audit = None

    def planned(plan: Any) -> None:  # the caller shows the plan from its result
        if result is not None:
            result.plan = plan.to_dict()
        if on_plan is not None:
            on_plan(plan)

    try:
        audit = Audit(cfg, work, progress=progress, on_plan=planned, shard=shard)
        audit.plan(model, images)
        audit.run_units()
        report: dict[str, Any] = {"ok": True, "units": shard.units}
        _post(world, "")
    except Exception as err:  # sent to rank 0, which stops the job with it
        text = str(err) if isinstance(err, SaliauditError) else f"{type(err).__name__}: {first_line(err)}"
        report = {"ok": False, "message": f"rank {world.rank} failed on {shard.where}: {text}"}
    finally:
        if world.rank != 0:
            shutil.rmtree(work, ignore_errors=True)
    report.update(
        rank=world.rank,
        device=str(audit.device) if audit is not None else None,
        images=len(shard.images),
        seconds=round(time.perf_counter() - t0, 3),
    )
    try:
        gathered = _gather(report, world)
    except Exception as err:  # a rank died before sending its work (torchrun stops the job)
        where = "; ".join(unfinished(world)) or "a rank stopped"
        raise DistributedError(
            f"the ranks' work could not be gathered ({where}; the transport said: "
            f"{first_line(err).split('. ')[0]})",
            hint="torchrun's report below names the rank that stopped",
        ) from err
    if gathered is None:  # rank > 0: done
        if not report["ok"]:
            raise DistributedError(report["message"])
        return None
    failed = [r for r in gathered if not r["ok"]]
    if failed:
        raise DistributedError(failed[0]["message"], hint="fix the cause and rerun the job")
    pool: dict[tuple[int, str], dict[str, Any]] = {}
    for r in gathered:
        for key, unit in r["units"].items():
            for rel, data in (unit.pop("files", None) or {}).items():
                atomic_write(Path(out_dir) / rel, data)
            pool[key] = unit
    assert audit is not None
    # rank 0's own share measured against the plan (the replay only adds recorded numbers)
    per_stage = {**audit.timer.per_stage, **audit.runner.timings}
    plan, plan_record = audit.plan_, audit._plan_record(per_stage)
    del audit  # its model and maps: the replay loads the model again
    release_memory()
    final = Audit(cfg, out_dir, result=result, shard=Shard(world, pool))
    final.plan(model, images, reuse=plan)
    final.run()
    final.result.plan = plan_record
    final.result.timings = {
        "total_s": time.perf_counter() - t0,
        "per_stage": {k: round(v, 4) for k, v in per_stage.items()},
        "replay_s": round(final.result.timings["total_s"], 4),
    }
    final.result.run["duration_s"] = round(time.perf_counter() - t0, 3)
    final.result.run["world_size"] = world.size
    final.result.run["ranks"] = [
        {k: r[k] for k in ("rank", "device", "images", "seconds")}
        for r in sorted(gathered, key=lambda r: r["rank"])
    ]
    return final
