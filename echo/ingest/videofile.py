"""One video file (AVI, MP4, MOV, MKV; any codec FFmpeg decodes) -> grayscale frames, via PyAV.

Every frame is decoded in presentation order (FFmpeg applies MP4 edit lists and reorders
B-frames), converted to luma by FFmpeg's scaler and reduced to the working grid as it is
decoded (``echo.ingest.frames.FrameStack``). The header's frame count and size are checked
against the pixel budget before the first frame is decoded, and again as frames arrive for
containers that do not declare a count.

Messages name the file only by the caller's opaque ``name``; FFmpeg's own messages are not
passed on, since they can quote container metadata (titles, comments) that may name a patient.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import av
import numpy as np

from echo.ingest.frames import FrameStack, SkipFile, check_pixel_budget, work_shape

__all__ = ["CONTAINERS", "VideoHeader", "is_video", "read_video"]

# PyAV's container format names (FFmpeg demuxers) that ingest opens.
CONTAINERS = frozenset({"avi", "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"})
_MAX_FPS = 1000.0


@dataclass(frozen=True)
class VideoHeader:
    """What the container declares: frames (estimated from the duration when not declared),
    rate in frames per second, and the stored frame size in pixels."""

    n_frames: int
    fps: float
    rows: int
    cols: int


def is_video(data: bytes) -> bool:
    """Whether ``data`` starts like an AVI (RIFF/AVI), ISO-BMFF/QuickTime (MP4, MOV) or
    Matroska/WebM file."""
    head = data[:12]
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"):
        return True
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        return True
    return head[:4] == b"\x1a\x45\xdf\xa3"


def _header(container, stream, name: str) -> VideoHeader:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if not 0 < fps <= _MAX_FPS:
        raise SkipFile("no_frame_rate", f"{name}: the video declares no usable frame rate")
    n = int(stream.frames or 0)
    if n <= 0:
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        else:
            seconds = (container.duration or 0) / av.time_base
        n = max(1, math.ceil(seconds * fps))
    return VideoHeader(n_frames=n, fps=fps, rows=int(stream.height), cols=int(stream.width))


def read_video(data: bytes, name: str, size: tuple[int, int], max_pixels: int) -> tuple[np.ndarray, VideoHeader]:
    """Decode every frame of a video file's bytes to ``(T, h, w)`` uint8 luma on the working
    grid for output ``size`` (``echo.ingest.frames.work_shape``), with the container's header.

    Raises ``SkipFile`` with reason ``unsupported_container`` (not AVI/MP4/MOV/MKV),
    ``no_video_stream``, ``no_frame_rate``, ``over_budget``, ``single_frame`` or ``corrupt``.
    """
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise SkipFile("corrupt", f"{name}: not a readable video ({type(e).__name__})") from None
    with container:
        if container.format.name not in CONTAINERS:
            raise SkipFile("unsupported_container", f"{name}: container {container.format.name!r} is not AVI, MP4, MOV or MKV")
        if not container.streams.video:
            raise SkipFile("no_video_stream", f"{name}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        header = _header(container, stream, name)
        check_pixel_budget(header.n_frames, header.rows, header.cols, max_pixels, name)
        # Containers that declare no count (or a wrong one) are held to the budget as frames arrive.
        stack = FrameStack(work_shape(header.rows, header.cols, size), max_pixels // (header.rows * header.cols), name)
        try:
            for frame in container.decode(stream):
                gray = frame.to_ndarray(format="gray")
                if gray.shape != (header.rows, header.cols):
                    raise SkipFile("corrupt", f"{name}: the frame size changes inside the video")
                stack.add(gray)
        except SkipFile as e:
            if e.reason == "corrupt" and len(stack) >= stack.max_frames:
                raise SkipFile("over_budget", f"{name}: more than {stack.max_frames} frames of {header.rows}x"
                               f"{header.cols}, over the budget (--max-pixels)") from None
            raise
        except (av.error.FFmpegError, ValueError) as e:
            raise SkipFile("corrupt", f"{name}: decoding failed after {len(stack)} frame(s) ({type(e).__name__})") from None
    frames = stack.array()
    if len(frames) < 2:
        raise SkipFile("single_frame", f"{name}: a single frame, not a cine")
    return frames, VideoHeader(n_frames=len(frames), fps=header.fps, rows=header.rows, cols=header.cols)
