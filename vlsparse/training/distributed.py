"""Training on many processes: ``torchrun`` + :mod:`torch.distributed` + DistributedDataParallel (DDP).

Every training command (find-ticket, train-ticket, pretrain, transfer, main-job) runs unchanged under
``torchrun --nproc_per_node N [--nnodes M ...] -m vlsparse ...``: torchrun sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (PyTorch docs, "torchrun (Elastic Launch)"),
:func:`run_main` (called by ``vlsparse.cli.main``) joins the process group and every rank runs the same command.
What changes with the world size W:

- training: the model is wrapped in DDP (gradients averaged over the ranks); ``--batch-size`` B stays the
  global batch: every rank draws the same shuffled global batch (same seed) and takes its contiguous slice of
  B / W examples (:class:`RankBatches`), so the examples, the loss (a mean over the batch) and the update are
  those of one process up to floating-point reduction order. Dropout draws differ (each rank draws masks for
  its own slice, seeded ``seed + rank``): with dropout > 0 a run is as close to the one-process run as two
  draws of dropout are; with dropout 0 the weights agree to float rounding (tests/test_distributed.py).
- pre-training (:mod:`vlsparse.training.pretrain`): every rank draws the same global batch and the objective's
  random choices for all of it, computes the objective on its equal share of the rows (:func:`even_share`), its
  loss weighted by its share of the objective's terms (:func:`all_sum`), and the gradients are averaged by
  :func:`average_gradients` (one all-reduce; the objectives call parts of the model, which DDP cannot wrap); the
  starting weights are rank 0's (:func:`broadcast_parameters`).
- evaluation: each rank predicts a contiguous shard of the split (:func:`shard_range`, no padding) and the
  logits are gathered in order (:func:`gather`), so every example counts exactly once (retrieval sets: a shard
  of the captions, each scored against every image).
- files: only rank 0 writes (:func:`main_only`) and decides what is already on disk; the other ranks wait for
  it, and its error reaches them.
- masks: every rank computes them from identical weights; :func:`check_same_tensors` compares fingerprints
  before every IMP round and every re-training of a ticket.
- errors: a rank that raises prints its error and leaves with ``os._exit`` (code 2 for user errors, 1
  otherwise); torchrun then stops the other ranks (and gloo / NCCL collectives waiting on it fail).

Backend: ``gloo`` without CUDA; with CUDA ``cpu:gloo,cuda:nccl`` (NCCL for CUDA tensors, gloo for the CPU
tensors of :func:`gather`), each process on GPU ``LOCAL_RANK``. torch is imported lazily: the torch-free CLI
imports this module.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any


class RankFailed(RuntimeError):
    """Another rank (rank 0 in :func:`main_only`) failed; its message is in this one. Printed by that rank only."""

    quiet_on_other_ranks = True


class SameOnEveryRank(ValueError):
    """A user error that every rank raises alike (e.g. a batch size that the world size does not divide):
    printed once, by rank 0."""

    quiet_on_other_ranks = True


def launched() -> bool:
    """True when the environment names more than one process (``WORLD_SIZE`` > 1, as torchrun sets it)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment variables (once); True if in a group of > 1.

    Backend ``gloo`` on CPU-only machines, ``cpu:gloo,cuda:nccl`` with CUDA (and ``torch.cuda.set_device(
    LOCAL_RANK)``). The collective timeout is ``VLSPARSE_DIST_TIMEOUT`` seconds (default 1800).
    """
    if not launched():
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, timeout=timedelta(seconds=float(os.environ.get("VLSPARSE_DIST_TIMEOUT",
                                                                                          "1800"))))
    return dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the group (0 when not distributed; before joining, torchrun's ``RANK``)."""
    if "torch.distributed" in sys.modules and (d := _dist()) is not None:
        return d.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes in the group (1 when not distributed)."""
    if "torch.distributed" in sys.modules and (d := _dist()) is not None:
        return d.get_world_size()
    return 1


def is_main() -> bool:
    """True on rank 0 (the process that writes files, logs and draws progress bars)."""
    return rank() == 0


def local_batch_size(batch_size: int) -> int:
    """The examples per rank of a global batch of ``batch_size``: ``batch_size / world_size()``.

    Raises:
        SameOnEveryRank: the world size does not divide ``batch_size``.
    """
    w = world_size()
    if batch_size % w:
        raise SameOnEveryRank(f"--batch-size {batch_size} is the global batch and must be divisible by the "
                              f"number of processes ({w})")
    return batch_size // w


def shard_range(n: int, r: int | None = None, w: int | None = None) -> range:
    """Rank ``r``'s contiguous share of ``n`` items out of ``w`` ranks (sizes differ by at most 1; no padding,
    so the shards of all ranks, in rank order, are ``range(n)`` exactly once)."""
    r, w = rank() if r is None else r, world_size() if w is None else w
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def even_share(n: int, what: str, r: int | None = None, w: int | None = None) -> range:
    """Rank ``r``'s equal contiguous share of a global batch of ``n`` examples: ``range(r * n / W, (r + 1) * n / W)``.

    Raises:
        SameOnEveryRank: W does not divide ``n`` (``what`` names the batch in the message).
    """
    r, w = rank() if r is None else r, world_size() if w is None else w
    if n % w:
        raise SameOnEveryRank(f"a global batch of {n} {what} (the training split is smaller than --batch-size) is "
                              f"not divisible by the number of processes ({w})")
    size = n // w
    return range(r * size, (r + 1) * size)


class RankBatches:
    """A batch sampler that yields this rank's slice of every global batch of ``inner`` (a batch sampler over
    the whole dataset, the same on every rank): ``batch[r * len(batch) / W : (r + 1) * len(batch) / W]``.

    Raises (when iterated):
        SameOnEveryRank: a global batch (e.g. a data set smaller than the batch) that W does not divide.
    """

    def __init__(self, inner, r: int | None = None, w: int | None = None):
        self.inner, self.r, self.w = inner, rank() if r is None else r, world_size() if w is None else w

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.inner:
            share = even_share(len(batch), "examples", self.r, self.w)
            yield list(batch[share.start:share.stop])

    def __len__(self) -> int:
        return len(self.inner)


def wrap(model, device):
    """``model`` in DistributedDataParallel when distributed (``device_ids`` = the current GPU on CUDA), else
    ``model`` itself. Parameters and buffers are broadcast from rank 0 when wrapping."""
    if world_size() == 1:
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.cuda.current_device()] if torch.device(device).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def _parameters(modules) -> list:
    """The distinct parameters of ``modules``, in order (a parameter shared by two modules once)."""
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def average_gradients(*modules) -> None:
    """All-reduce the gradients of the parameters of ``modules`` to their mean over the ranks, in one collective
    per device and dtype (for training that DDP cannot wrap: adversarial steps with several forward passes,
    pre-training objectives that call parts of the model); a no-op on one process. Every rank must hold
    gradients for the same parameters (they run the same step)."""
    w = world_size()
    if w == 1:
        return
    import torch
    import torch.distributed as dist

    groups: dict[tuple, list] = {}
    for p in _parameters(modules):
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(w)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_parameters(*modules) -> None:
    """Copy rank 0's parameters and buffers of ``modules`` to every rank (as DDP does when it wraps a model),
    so that training that is not wrapped in DDP starts from one state; a no-op on one process."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            dist.broadcast(t.data, 0)


def all_sum(values: Sequence[float]) -> list[float]:
    """The element-wise sum over the ranks of ``values`` (float64; ``list(values)`` on one process)."""
    if world_size() == 1:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def gather(obj: Any) -> list[Any]:
    """Every rank's (picklable) ``obj``, in rank order, on every rank (``[obj]`` on one process). Sent as CPU
    uint8 tensors, so the gloo backend carries it even next to NCCL."""
    w = world_size()
    if w == 1:
        return [obj]
    import torch
    import torch.distributed as dist

    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(w)]
    dist.all_gather(sizes, torch.tensor([data.numel()]))
    longest = max(int(s) for s in sizes)
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(w)]
    dist.all_gather(parts, torch.cat([data, torch.zeros(longest - data.numel(), dtype=torch.uint8)]))
    return [pickle.loads(p[:int(s)].numpy().tobytes()) for p, s in zip(parts, sizes)]


def main_only(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only (file writes, checks of files) while the other ranks wait; every rank returns
    rank 0's (picklable) result.

    Raises:
        whatever ``fn`` raised, on rank 0; :class:`RankFailed` with its message on the other ranks.
    """
    if world_size() == 1:
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - relayed to the other ranks, then re-raised
            error = exc
    got, message = gather((result, None if error is None else f"{type(error).__name__}: {error}")
                          if is_main() else None)[0]
    if error is not None:
        raise error
    if message is not None:
        raise RankFailed(f"rank 0 failed: {message}")
    return got


def fingerprint(tensors: dict) -> str:
    """SHA-256 (hex) of a name -> tensor dict (names, dtypes, shapes and bytes), e.g. a mask."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def check_same(value: Any, what: str) -> None:
    """Check that ``value`` (picklable, comparable) is equal on every rank.

    Raises:
        RuntimeError: it differs (naming ``what`` and the ranks that differ from rank 0).
    """
    values = gather(value)
    bad = [r for r, v in enumerate(values) if v != values[0]]
    if bad:
        raise RuntimeError(f"{what} differs between ranks: rank(s) {bad} disagree with rank 0; the ranks have "
                           "diverged (a mismatch is never ignored)")


def check_same_tensors(tensors: dict, what: str) -> None:
    """:func:`check_same` on the :func:`fingerprint` of ``tensors`` (e.g. a mask); nothing is hashed in a
    single process.

    Raises:
        RuntimeError: the tensors differ between ranks.
    """
    if world_size() > 1:
        check_same(fingerprint(tensors), what)


def run_main(app: Callable[[], None], error_line: Callable[[BaseException], str | None]) -> None:
    """The CLI's entry point under torchrun: join the group, run ``app`` on every rank, leave cleanly.

    Ranks other than 0 print nothing on stdout and no warnings. A rank whose ``app`` raises prints
    ``error_line(exc)`` (one line, e.g. ``error: ...``; a traceback for unexpected errors), prefixed with its
    rank on ranks > 0 (errors relayed from rank 0 or raised alike everywhere are printed by rank 0 only), and
    exits at once with ``os._exit`` (2 for user errors, else 1), which brings the group down: torchrun stops
    the remaining ranks. On success the process group is destroyed after a barrier and the process leaves with
    ``os._exit(0)`` once stdout and stderr are flushed: everything it writes is already on disk (atomic writes),
    and skipping the interpreter's finalisation avoids gloo's worker threads being torn down with it, which
    aborts a rank now and then ("terminate called without an active exception", exit -6: seen once in the test
    suite under load; pytorch/pytorch#179291 describes the race).
    """
    init_from_env()
    r, w = rank(), world_size()
    if r:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        warnings.simplefilter("ignore")
    try:
        app()
        code = 0
    except SystemExit as exc:  # click / typer exit with sys.exit(code)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: BLE001 - reported, then the process leaves
        line = error_line(exc)
        if not (r and getattr(exc, "quiet_on_other_ranks", False)):
            if line is None:
                traceback.print_exc()
            prefix = f"[rank {r}/{w}] " if r else ""
            sys.stderr.write(prefix + (line or f"error: {type(exc).__name__}: {exc}") + "\n")
        code = 2 if line else 1
    if code == 0:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shard(items: Sequence) -> Sequence:
    """This rank's contiguous share of ``items`` (a sequence or a Dataset with ``len``), see :func:`shard_range`."""
    from torch.utils.data import Subset

    return Subset(items, list(shard_range(len(items))))


__all__ = ["RankBatches", "RankFailed", "SameOnEveryRank", "all_sum", "average_gradients", "broadcast_parameters",
           "check_same", "check_same_tensors", "even_share", "fingerprint", "gather", "init_from_env", "is_main",
           "launched", "local_batch_size", "main_only", "rank", "run_main", "shard", "shard_range", "world_size",
           "wrap"]
