"""The one way to turn a video into a probability of severe aortic stenosis.

``echo-ssl predict``, ``echo-ssl evaluate``, the fine-tuning job's evaluation, the pyfunc
(REST) server, saliency and attribution all score through this module, so they give the
same number for the same video and model:

1. clips: ``num_clips`` evenly spaced clips of ``clip_len`` frames, ``stride`` apart, each
   min-max scaled to ``[0, 1]``, resized to ``frame_size`` (bilinear, antialiased) when the
   video has another size (:func:`echo.data.clips.eval_clips`);
2. the classifier's logit per clip (float32);
3. the video's probability: the mean over its clips of ``sigmoid(logit)``, in float64.

:class:`echo.model.preprocessing.Preprocessing` holds the settings of step 1; a model bundle
records them (``echo.serve.bundle.BundleMeta.preprocessing``), and ``PREPROCESSING_VERSION``
there names this recipe.
"""

from __future__ import annotations

import torch
from torch import nn

from echo.data.clips import eval_clips
from echo.model.preprocessing import Preprocessing

__all__ = ["video_clips", "clip_logits", "video_probabilities"]


def video_clips(pre: Preprocessing, data: bytes, uri: str) -> torch.Tensor:
    """MP4 bytes of one video -> its clips ``(K, 1, T, H, W)`` float32 in ``[0, 1]``
    (``K = num_clips``, ``T = clip_len``, ``(H, W) = frame_size``). Raises
    ``echo.data.video.VideoDecodeError`` naming ``uri`` for an unreadable video."""
    clips = eval_clips(data, uri, pre.clip_len, pre.num_clips, pre.stride, pre.frame_size)
    return torch.from_numpy(clips).unsqueeze(1)


def clip_logits(model: nn.Module, clips: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Logits ``(..., K)`` float32 of clips ``(..., K, 1, T, H, W)`` (any leading batch shape),
    without gradients, returned on the CPU; the caller puts ``model`` in eval mode."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    lead = clips.shape[:-4]
    with torch.inference_mode():
        logits = model(clips.reshape(-1, *clips.shape[-4:]).to(device)).float()
    return logits.cpu().reshape(lead)


def video_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Clip logits ``(B, K)`` -> video probabilities ``(B,)`` float64: the mean over the K clips
    of ``sigmoid(logit)``, computed in float64."""
    return torch.sigmoid(logits.double()).mean(dim=-1)
