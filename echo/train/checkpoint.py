"""Training checkpoints that hold everything needed to resume exactly.

A checkpoint is a folder holding ``state.pt``: model, optimizer, scheduler and grad-scaler
state dicts, the number of completed epochs, the global step, the RNG states, the resolved
config and the MLflow run ID. It is written with ``torch.save`` and read back with
``weights_only=True`` (no code runs on load). Data-order randomness needs no saved state:
every clip, crop and permutation derives from ``(seed, epoch, row)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

import torch

__all__ = ["STATE_FILE", "save_state", "load_state", "rng_state", "set_rng_state", "checkpoint_due", "resume_state",
           "training_state"]

STATE_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


def save_state(folder: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``folder/state.pt`` (atomically) and return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)
    return folder


def load_state(folder: str | os.PathLike) -> dict[str, Any]:
    """Read ``folder/state.pt`` with ``weights_only=True``; the error names the folder."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {folder} holds no {STATE_FILE}")
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_due(epoch: int, epochs: int, every: int) -> bool:
    """Whether the 0-based ``epoch`` ends with a checkpoint (every ``every`` epochs, and the last)."""
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


def resume_state(
    state: dict[str, Any] | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, int, dict[str, Any] | None]:
    """Restore a checkpoint's ``state`` (a session's ``latest_state()``) into the given objects.

    Returns ``(completed_epochs, global_step, state)``; ``(0, 0, None)`` for a fresh start (``state`` None).
    """
    if state is None:
        return 0, 0, None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["epoch"]), int(state["step"]), state


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, step: int, config: Any,
                   **extra: Any) -> dict[str, Any]:
    """The checkpoint state that ``resume_state`` restores: weights, optimizer, schedule,
    completed epochs, global step, RNG states and the config (a dataclass, as JSON), plus ``extra``."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "rng": rng_state(),
        "config": json.dumps(dataclasses.asdict(config)),
        **extra,
    }
