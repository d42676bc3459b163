"""The frame-order table of EchoCLR's pretext task (Holste et al. 2022).

A clip's frames are shuffled with one of the ``clip_len!`` permutations and a head predicts
which one; the dataset draws the permutation, the model sizes its head by ``clip_len!``
and the loss scores it, all from this one table.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor

__all__ = ["MAX_ORDER_CLIP_LEN", "permutations"]

# 8! = 40320 classes; beyond that the frame-order head and table stop being sensible.
MAX_ORDER_CLIP_LEN = 8


@functools.lru_cache(maxsize=None)
def _permutation_table(clip_len: int) -> Tensor:
    return torch.tensor(list(itertools.permutations(range(clip_len))), dtype=torch.long)


def permutations(clip_len: int) -> Tensor:
    """All orderings of ``clip_len`` frames, in lexicographic order.

    Returns:
        LongTensor (clip_len!, clip_len); row ``k`` is the permutation with class label ``k``
        (``itertools.permutations(range(clip_len))`` order, so row 0 is the identity).
        Shuffle a clip (C, T, H, W) with ``clip[:, perm]``.
    """
    if not isinstance(clip_len, int) or isinstance(clip_len, bool) or not 1 <= clip_len <= MAX_ORDER_CLIP_LEN:
        raise ValueError(
            f"permutations: clip_len must be an int in [1, {MAX_ORDER_CLIP_LEN}] "
            f"(the frame-order task has clip_len! classes), got {clip_len!r}"
        )
    return _permutation_table(clip_len).clone()
