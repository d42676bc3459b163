"""Self-supervised losses: NT-Xent over the global batch, and the frame-order task.

- :class:`NTXentLoss`: the normalized temperature-scaled cross-entropy of SimCLR
  (Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
  Representations", ICML 2020, arXiv:2002.05709, eq. 1), with negatives from every rank.
- :func:`frame_order_loss`: the frame re-ordering pretext task of EchoCLR (Holste et al.
  2022): a clip's frames are shuffled with one of the ``clip_len!`` permutations of
  :func:`echo.data.order.permutations` and a head predicts which one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echo.train.distributed import gather_rows, world_size

__all__ = ["NTXentLoss", "frame_order_loss"]


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent loss (Chen et al. 2020), with negatives from the global batch.

    For a global batch of ``N`` pairs there are ``2N`` embeddings; each one is an anchor whose
    positive is its partner view and whose negatives are the other ``2N - 2`` embeddings:

        l_i = -log( exp(sim(i, p(i)) / τ) / sum_{k != i} exp(sim(i, k) / τ) ),
        L   = (1 / 2N) * sum_i l_i,          sim = cosine similarity.

    Under ``torch.distributed`` (and ``gather_distributed=True``) the embeddings of every rank
    are gathered with gradients (:func:`echo.train.distributed.gather_with_grad`) and each rank
    computes the terms of its own anchors against all ``2N`` columns. The rank's
    back-propagated loss is its share scaled by the world size ``W``,
    ``L_r = (W / 2N) * sum_{i in rank r} l_i``, so that DDP's gradient averaging yields exactly
    the gradient of ``L`` (ranks may hold different numbers of rows). The *value* returned is
    the global ``L`` on every rank (one scalar all-reduce), fit for logging.

    Args:
        temperature: τ > 0 (the paper's EchoCLR setting is 0.05).
        gather_distributed: take negatives from all ranks when a process group is initialised;
            False computes the loss on this rank's batch only.
    """

    def __init__(self, temperature: float = 0.05, gather_distributed: bool = True) -> None:
        super().__init__()
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"NTXentLoss: temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.gather_distributed = bool(gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"

    def forward(self, z0: Tensor, z1: Tensor) -> tuple[Tensor, Tensor]:
        """Loss and positive-retrieval accuracy of two views.

        Args:
            z0: (N, D) embeddings of the first views (this rank's rows).
            z1: (N, D) embeddings of the second views; row i is the positive of ``z0[i]``.

        Returns:
            ``(loss, accuracy)``: scalar loss (differentiable; value = global-batch loss), and
            the detached fraction of the ``2N_global`` anchors whose most similar other
            embedding is their positive (top-1 among the ``2N_global - 2`` negatives).
        """
        if z0.ndim != 2 or z1.ndim != 2:
            raise ValueError(
                f"NTXentLoss: z0 and z1 must be (N, D) embeddings, got shapes {tuple(z0.shape)} and {tuple(z1.shape)}"
            )
        if z0.shape != z1.shape:
            raise ValueError(
                f"NTXentLoss: z0 and z1 must have the same shape (N, D), got {tuple(z0.shape)} and {tuple(z1.shape)}"
            )
        if z0.shape[1] == 0:
            raise ValueError("NTXentLoss: embeddings have D = 0 features")

        # Similarities in (at least) float32 even inside an autocast region: at τ = 0.05 the
        # logits reach 1/τ = 20, and bf16's 8-bit mantissa would blur them by ~0.1.
        with torch.autocast(device_type=z0.device.type, enabled=False):
            return self._loss(z0, z1)

    def _loss(self, z0: Tensor, z1: Tensor) -> tuple[Tensor, Tensor]:
        n_local = z0.shape[0]
        dtype = torch.promote_types(z0.dtype, torch.float32)
        local = F.normalize(torch.stack([z0, z1], dim=1).to(dtype), dim=-1)  # (n, 2, D)
        world = world_size() if self.gather_distributed else 1
        everyone, offset = gather_rows(local) if world > 1 else (local, 0)  # (N, 2, D)
        n_global = everyone.shape[0]
        if n_global < 2:
            raise ValueError(
                f"NTXentLoss: needs at least 2 pairs in the global batch (got {n_global}): "
                "with one pair there are no negatives"
            )

        columns = torch.cat([everyone[:, 0], everyone[:, 1]])  # (2N, D): views 0, then views 1
        anchors = torch.cat([local[:, 0], local[:, 1]])  # (2n, D)
        logits = anchors @ columns.T / self.temperature  # (2n, 2N)

        idx = torch.arange(n_local, device=logits.device) + offset  # global pair index of each row
        self_col = torch.cat([idx, idx + n_global])
        pos_col = torch.cat([idx + n_global, idx])
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[torch.arange(2 * n_local, device=logits.device), self_col] = True
        logits = logits.masked_fill(is_self, float("-inf"))
        per_anchor_sum = F.cross_entropy(logits, pos_col, reduction="sum")
        correct = (logits.argmax(dim=1) == pos_col).sum().detach().to(torch.float64)

        n_anchor = 2 * n_global
        loss_for_grad = per_anchor_sum * (world / n_anchor)
        if world == 1:
            return loss_for_grad, (correct / n_anchor).to(loss_for_grad.dtype)

        totals = torch.stack([per_anchor_sum.detach().to(torch.float64), correct])
        torch.distributed.all_reduce(totals)
        global_loss = (totals[0] / n_anchor).to(loss_for_grad.dtype)
        # Value of the global loss, gradient of this rank's share.
        loss = loss_for_grad + (global_loss - loss_for_grad.detach())
        return loss, (totals[1] / n_anchor).to(loss.dtype)


def frame_order_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of the frame-order head.

    Args:
        logits: (N, K) scores over the ``K = clip_len!`` permutations.
        target: (N,) integer class labels in [0, K): rows of :func:`echo.data.order.permutations`.

    Returns:
        Scalar mean cross-entropy.
    """
    if logits.ndim != 2:
        raise ValueError(f"frame_order_loss: logits must be (N, K), got shape {tuple(logits.shape)}")
    if target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"frame_order_loss: target must be (N,) with N = {logits.shape[0]}, got shape {tuple(target.shape)}"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"frame_order_loss: target must hold integer class labels, got dtype {target.dtype}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= logits.shape[1]):
        raise ValueError(
            f"frame_order_loss: target labels must lie in [0, {logits.shape[1]}), "
            f"got range [{int(target.min())}, {int(target.max())}]"
        )
    return F.cross_entropy(logits.float(), target.long())
