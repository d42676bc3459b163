"""Optimizers, learning-rate schedules and the one optimizer step that pretraining and fine-tuning share."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from echo.train.settings import OPTIMIZERS, SCHEDULES

__all__ = ["build_optimizer", "optimizer_step"]


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str,
    lr: float,
    weight_decay: float,
    epochs: int,
    warmup_epochs: int,
    schedule: str,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Optimizer (``adam`` as published, ``adamw`` or ``sgd``) and a per-epoch schedule.

    ``schedule`` is ``constant`` or ``cosine``; both start with ``warmup_epochs`` of linear
    warm-up. The scheduler steps once per epoch, so resuming at epoch k continues it exactly.
    """
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif name == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    else:
        raise ValueError(f"unknown optimizer {name!r} ({', '.join(OPTIMIZERS)})")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} ({', '.join(SCHEDULES)})")

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        if schedule == "constant":
            return 1.0
        span = max(1, epochs - warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - warmup_epochs) / span)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   grad_clip: float) -> None:
    """Backward, optional gradient-norm clipping (``grad_clip`` > 0), and one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
