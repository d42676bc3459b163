"""Process-group helpers and an autograd-aware all-gather for losses over the global batch.

Gradient convention (the one ``DistributedDataParallel`` expects)
-----------------------------------------------------------------
DDP *averages* parameter gradients over the ``W`` ranks. A loss that is computed on the
global batch therefore has to be split so that the **mean over ranks of the per-rank losses
equals the global loss**, i.e. rank ``r`` back-propagates ``L_r`` with
``(1/W) * sum_r L_r = L_global``. :func:`gather_with_grad` then makes the gradients exact:
its backward pass ``all_reduce(SUM)``\\ s the gradient that every rank's loss sends to the
gathered tensor and returns this rank's rows, so rank ``r`` receives
``sum_s dL_s/dx_r``, and after DDP's averaging every parameter gets
``(1/W) sum_r sum_s dL_s/dx_r dx_r/dθ = dL_global/dθ``. A gather without gradients, or one
whose backward keeps only the local gradient, loses the other ranks' terms; one that
averages instead of summing is off by ``1/W``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from typing import Any, Iterable, Iterator

from torch import Tensor

__all__ = ["is_distributed", "rank", "world_size", "is_rank0", "all_reduce_sum", "gather_objects", "lockstep",
           "gather_with_grad", "gather_rows"]


def is_distributed() -> bool:
    """True when a default process group is initialised (``torch.distributed``)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank0() -> bool:
    """True on rank 0, and when not distributed."""
    return rank() == 0


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over all ranks (identity without a process group)."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def lockstep(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """Yield batches while every rank still has one.

    Skipped videos can leave ranks with different batch counts; DDP needs every rank to
    take the same number of steps, so each step first agrees (one tiny all-reduce) that all
    ranks have a batch. Time spent waiting for data is in ``lockstep.wait_s`` of the iterator.
    """
    it = iter(batches)
    while True:
        try:
            batch = next(it)
            have = 1.0
        except StopIteration:
            batch, have = None, 0.0
        if world_size() > 1:
            flag = torch.tensor([have], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            have = float(flag.item())
        if have == 0.0:
            # Drain so that loader workers finish their shard cleanly.
            if batch is not None:
                for _ in it:
                    pass
            return
        yield batch


def _row_counts(n_local: int, device: torch.device) -> list[int]:
    """Rows held by each rank (one small all_gather)."""
    mine = torch.tensor([n_local], dtype=torch.long, device=device)
    counts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, mine)
    return [int(c.item()) for c in counts]


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate ``x`` (n_r, ...) from every rank along dim 0, given every rank's ``n_r``."""

    @staticmethod
    def forward(ctx, x: Tensor, counts: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        x = x.contiguous()
        n_max = max(counts)
        # all_gather needs equal shapes: pad to the largest rank's rows, strip afterwards.
        padded = x
        if x.shape[0] < n_max:
            padded = torch.cat([x, x.new_zeros((n_max - x.shape[0], *x.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        me = dist.get_rank()
        ctx.start = sum(counts[:me])
        ctx.stop = ctx.start + counts[me]
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd owns ``grad``
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop], None


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """Like :func:`gather_with_grad`, also returning the global index of this rank's first row.

    Returns:
        ``(gathered, offset)``: gathered (sum_r n_r, ...); ``gathered[offset:offset + n]`` is
        ``x``. ``(x, 0)`` when not distributed.
    """
    if world_size() == 1:
        return x, 0
    counts = _row_counts(x.shape[0], x.device)
    return _GatherWithGrad.apply(x, tuple(counts)), sum(counts[: dist.get_rank()])


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` over the default process group, differentiably.

    Args:
        x: (n_r, ...) this rank's rows; ``n_r`` may differ between ranks, the trailing
            shape, dtype and device must not (on NCCL, ``x`` lives on this rank's GPU).

    Returns:
        (sum_r n_r, ...) the rows of rank 0, then rank 1, ...; ``x`` itself when torch.distributed
        is not initialised or the world size is 1. The backward pass sums the incoming
        gradients over ranks and returns this rank's slice (see the module docstring for why
        that is exact under DDP's gradient averaging). Every rank must call it (it is a
        collective: two all_gathers forward, one all_reduce backward), in the same order.
    """
    return gather_rows(x)[0]
