"""Video bytes <-> frames: H.264 encoding (PyAV) and frame-accurate decoding (decord) in memory.

Canonical storage format: H.264 in MP4, yuv420p, a keyframe every ``KEYFRAME_INTERVAL``
frames, no B-frames and no edit lists, because decord seeks slowly on long GOPs and returns
wrong frames on B-frame files and MP4 edit lists.

Frames are grayscale ``uint8`` arrays of shape ``(T, H, W)``; echo is grayscale, and a
colour source is converted with ITU-R BT.601 luma.

Untrusted bytes: before decord opens a video, ``check_video`` reads its headers with PyAV
(the same FFmpeg version, so it sees the container decord's FFmpeg will pick) and refuses a
container, codec or frame size outside ``ALLOWED_CONTAINERS``, ``ALLOWED_CODECS`` and
``MAX_FRAME_PIXELS`` (``UnsupportedVideo``, naming the URI). Bytes that passed are
remembered by their SHA-256 for the process, so a video read again (every epoch) is not
probed again. What decord and its FFmpeg write to stderr goes to this module's logger at
debug level, never carrying bytes of the input (``echo.data.native_stderr``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import platform
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

import numpy as np

from echo.data.native_stderr import routed_to, screened

__all__ = [
    "KEYFRAME_INTERVAL",
    "ALLOWED_CONTAINERS",
    "ALLOWED_CODECS",
    "MAX_FRAME_PIXELS",
    "VideoDecodeError",
    "UnsupportedVideo",
    "VideoHeader",
    "VideoInfo",
    "check_video",
    "encode_mp4",
    "decode_frames",
    "probe",
    "random_access_differs",
]

log = logging.getLogger(__name__)

KEYFRAME_INTERVAL = 8
MAX_KEYFRAME_INTERVAL_OK = 16
# decord replaces a frame it cannot decode with the last good one unless told otherwise; a
# threshold this small (a fraction of the frame count) makes the first such frame an error.
_FAULT_TOLERANCE = 1e-9
# FFmpeg demuxer names (one demuxer reads MP4 and QuickTime MOV) and decoder names
ALLOWED_CONTAINERS = frozenset({"mov", "mp4", "avi", "matroska"})
ALLOWED_CODECS = frozenset({"h264", "hevc", "mpeg4", "mjpeg"})
MAX_FRAME_PIXELS = 4096 * 4096  # width x height of one frame
_CHECKED_MAX = 65536  # SHA-256 digests of bytes that passed check_video, per process


class VideoDecodeError(RuntimeError):
    """A video that cannot be decoded; the message names its URI and the reason."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason
        super().__init__(f"cannot decode {uri}: {reason}")

    def __reduce__(self):  # picklable across Ray and loader processes
        return (type(self), (self.uri, self.reason))


class UnsupportedVideo(VideoDecodeError):
    """Bytes whose container, codec or frame size is not allowed, refused before any decoding."""


@dataclass(frozen=True)
class VideoHeader:
    """What the container's headers declare: FFmpeg's demuxer name (e.g.
    ``"mov,mp4,m4a,3gp,3g2,mj2"``), the video codec, and the frame size in pixels."""

    container: str
    codec: str
    width: int
    height: int


@dataclass(frozen=True)
class VideoInfo:
    n_frames: int
    fps: float
    height: int
    width: int
    keyframe_interval: int  # the longest gap between keyframes, in frames
    has_edit_list: bool


@functools.lru_cache(maxsize=1)
def _decord():
    """The decord module, imported after PyAV and torch.

    decord loads its library into the global symbol scope (ctypes ``RTLD_GLOBAL``) with its own
    FFmpeg build and C++ template instances: torch loaded after it bound some of those and
    crashed (a segfault in ``affine_grid``), and PyAV loaded after it sent part of its FFmpeg
    calls, logging included, to decord's libavutil. Imported first, each binds its own.
    Function-level imports: light commands that never decode stay free of all three.
    """
    import av  # noqa: F401
    import torch  # noqa: F401

    try:
        import decord
    except ImportError as e:  # pragma: no cover - decord is a hard dependency
        raise ImportError(
            "decord is required to decode videos: pip install 'decord2>=3.4,<4' "
            "(the maintained decord fork; same `import decord`)"
        ) from e
    return decord


def _yuv_frame(gray: np.ndarray):
    """A yuv420p ``av.VideoFrame`` of a gray ``(H, W)`` uint8 frame, limited range, with every
    plane's row padding zeroed: x264 reads the padding, and left uninitialised it makes the
    same frames encode to different bytes now and then."""
    import av

    h, w = gray.shape
    y = (16 + (gray.astype(np.uint16) * 219 + 127) // 255).astype(np.uint8)
    chroma = np.full((h // 2, w // 2), 128, np.uint8)
    frame = av.VideoFrame(w, h, "yuv420p")
    for plane, values in zip(frame.planes, (y, chroma, chroma)):
        padded = np.zeros((plane.height, plane.line_size), np.uint8)
        padded[:, : plane.width] = values
        plane.update(padded)
    return frame


# x264 instruction sets (its ``asm`` names) and the /proc/cpuinfo flags each needs, best first.
_X264_ASM = (
    ("SSE2Fast,AVX2", {"avx2", "fma", "bmi1", "bmi2", "avx", "sse4_2", "ssse3"}),
    ("SSE2Fast,AVX", {"avx", "sse4_2", "ssse3"}),
    ("SSE2Fast,SSE4.2", {"sse4_2", "sse4_1", "ssse3"}),
    ("SSE2Fast,SSSE3", {"ssse3"}),
    ("SSE2", {"sse2"}),
)


@functools.lru_cache(maxsize=1)
def _x264_asm() -> str:
    """The ``asm`` x264 parameter: the CPU's instruction sets up to AVX2, never AVX-512.

    x264's AVX-512 code (core 165) encoded the same frames differently about once in 1,000
    encodes on the development machine (the same alternative each time: 8 in 8,200 encodes;
    none in 9,500 without AVX-512). x264's SIMD code is bit-exact with its C code, so the
    output is the same bytes at the same speed. An empty string leaves x264's own choice
    (not an x86-64 Linux machine: no AVX-512 there).
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        return ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return ""
    return next((asm for asm, needs in _X264_ASM if needs <= flags), "")


def encode_mp4(frames: np.ndarray, fps: float, keyframe_interval: int = KEYFRAME_INTERVAL, crf: int = 18) -> bytes:
    """Encode gray ``frames`` ``(T, H, W)`` uint8 as H.264 MP4 bytes; the same frames always give
    the same bytes.

    ``fps`` is the true frame rate in frames per second. H and W must be even (yuv420p).
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 3 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty uint8 (T, H, W) gray array, got {frames.dtype} {frames.shape}")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"frame size must be even for yuv420p, got {h}x{w}")
    buf = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buf, mode="w", format="mp4", options={"use_editlist": "0"}) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = keyframe_interval
        stream.codec_context.max_b_frames = 0
        stream.codec_context.thread_count = 1  # x264's threaded output varied under load (seen in CI)
        asm = f":asm={asm}" if (asm := _x264_asm()) else ""
        stream.options = {
            "crf": str(crf),
            "preset": "veryfast",
            "x264-params": f"keyint={keyframe_interval}:min-keyint={keyframe_interval}:scenecut=0:bframes=0:threads=1{asm}",
        }
        for i, frame in enumerate(frames):
            vf = _yuv_frame(frame)
            vf.pts = i
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _to_gray(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 RGB -> ``(...)`` uint8 luma (BT.601)."""
    y = rgb.astype(np.float32) @ _LUMA  # float32 matrix product: ~8x faster than float64 per channel
    return np.clip(y + 0.5, 0, 255).astype(np.uint8)


_checked: OrderedDict[bytes, VideoHeader] = OrderedDict()
_checked_lock = threading.Lock()


def _read_header(data: bytes, uri: str) -> VideoHeader:
    """The headers' container, codec and largest frame size; ``UnsupportedVideo`` for what is
    not allowed. Every video stream must pass: decord's FFmpeg may pick any of them."""
    import av
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            names = container.format.name
            streams = [(s.codec_context.name, int(s.codec_context.width), int(s.codec_context.height))
                       for s in container.streams.video]
    except av.FFmpegError as e:
        raise UnsupportedVideo(uri, f"not a readable video ({type(e).__name__})") from None
    if not set(names.split(",")) & ALLOWED_CONTAINERS:
        raise UnsupportedVideo(uri, f"container {names!r} is not allowed (allowed: {', '.join(sorted(ALLOWED_CONTAINERS))})")
    if not streams:
        raise UnsupportedVideo(uri, "the file holds no video stream")
    for codec, _, _ in streams:
        if codec not in ALLOWED_CODECS:
            raise UnsupportedVideo(uri, f"codec {codec!r} is not allowed (allowed: {', '.join(sorted(ALLOWED_CODECS))})")
    codec, width, height = max(streams, key=lambda s: s[1] * s[2])
    return VideoHeader(names, codec, width, height)


def check_video(data: bytes, uri: str, max_pixels: int = MAX_FRAME_PIXELS) -> VideoHeader:
    """The container, codec and frame size ``data``'s headers declare, checked against
    ``ALLOWED_CONTAINERS``, ``ALLOWED_CODECS`` and ``max_pixels`` (width x height) without
    decoding a frame; raises ``UnsupportedVideo`` naming ``uri`` otherwise (also for bytes that
    are no video, and for an empty object).

    Bytes that passed are remembered (by SHA-256, per process) and not probed again.
    """
    if not data:
        raise UnsupportedVideo(uri, "empty object")
    digest = hashlib.sha256(data).digest()
    with _checked_lock:
        header = _checked.get(digest)
    if header is None:
        header = _read_header(data, uri)
        with _checked_lock:
            _checked[digest] = header
            while len(_checked) > _CHECKED_MAX:
                _checked.popitem(last=False)
    if header.width * header.height > max_pixels or header.width <= 0 or header.height <= 0:
        raise UnsupportedVideo(uri, f"frame size {header.width}x{header.height} is outside 1 to {max_pixels} pixels")
    return header


def _reader(data: bytes, uri: str):
    """A decord reader over checked bytes (``check_video``); call inside ``routed_to``."""
    check_video(data, uri)
    decord = _decord()
    try:
        return decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1, fault_tol=_FAULT_TOLERANCE)
    except Exception as e:  # decord raises DECORDError (a RuntimeError) or its own types
        raise VideoDecodeError(uri, f"not a readable video ({type(e).__name__}: {_first_line(e, data)})") from None


def _frame(vr, index: int, data: bytes) -> tuple[np.ndarray | None, str | None]:
    """Frame ``index`` of reader ``vr`` as decord gives it, ``(H, W, C)`` uint8, or ``None`` and
    why not. Nothing is raised: a traceback holding the reader would keep its decoding thread
    (which logs as it reads ahead) alive past the routed section."""
    try:
        return vr[index].asnumpy(), None
    except Exception as e:  # decord's DECORDError or RuntimeError
        return None, f"decoding frames failed ({type(e).__name__}: {_first_line(e, data)})"


def _first_line(error: Exception, data: bytes) -> str:
    """The first line of a decoder's error, cut short, never showing bytes of ``data``."""
    lines = str(error).splitlines()
    return screened(lines[0][:200].encode(), data) if lines else ""


def _rgb(frame: np.ndarray, uri: str) -> np.ndarray:
    """decord's frame ``(H, W, C)`` as ``(H, W, 3)`` RGB, whatever padding its rows carry.

    decord hands out FFmpeg's RGB24 buffer as it is when each row's length in bytes
    (``linesize``) is a multiple of the width, shaped ``(H, W, linesize // W)``: with the row
    alignment of FFmpeg 8 on AVX-512 machines a 32 px wide frame arrives as ``(32, 32, 6)``, 96
    px as ``(H, 96, 4)``. Each row's first ``3 * W`` bytes are the pixels. (decord's
    ``get_batch`` copies such frames into an ``(N, H, W, 3)`` buffer and fails on the size, so
    frames are taken one at a time; the seek work is the same.)
    """
    h, w, c = frame.shape
    if c == 3:
        return frame
    if c < 3:
        raise VideoDecodeError(uri, f"the decoder returned {c} channels, not RGB")
    return frame.reshape(h, w * c)[:, : 3 * w].reshape(h, w, 3)


def decode_frames(data: bytes, indices: Sequence[int] | Callable[[int], Sequence[int]], uri: str) -> np.ndarray:
    """Decode only the frames at ``indices`` from MP4 bytes; returns ``(len(indices), H, W)`` uint8.

    ``indices`` may be a function of the video's frame count, called once the container is
    open, so a caller that needs the count to choose frames opens the video only once.
    Give distinct indices in ascending order (``echo.data.clips.decode_at`` does): each step
    back costs a seek to a keyframe. Raises ``VideoDecodeError`` (naming ``uri``) for an unreadable video (including a frame
    decord could not decode) or an index past its end.
    """
    frames: list[np.ndarray] = []
    failure = None
    with routed_to(log, data, uri):
        vr = _reader(data, uri)
        try:
            n = len(vr)
            if n < 1:
                raise VideoDecodeError(uri, "the video has no frames")
            idx = [int(i) for i in (indices(n) if callable(indices) else indices)]
            if not idx:
                raise ValueError("no frame indices given")
            bad = [i for i in idx if i < 0 or i >= n]
            if bad:
                raise VideoDecodeError(uri, f"frame index {bad[0]} outside the video's {n} frames")
            for i in idx:  # ascending distinct indices decode each frame once, seeking only across keyframes
                frame, failure = _frame(vr, i, data)
                if failure:
                    break
                frames.append(_rgb(frame, uri))
        finally:
            del vr  # its decoding thread ends here, inside the routed section
    if failure:
        raise VideoDecodeError(uri, failure)
    return _to_gray(np.stack(frames))


def _mp4_has_edit_list(data: bytes) -> bool:
    """Whether the MP4's track boxes hold an ``elst`` (edit list) box."""
    containers = {b"moov", b"trak", b"edts", b"mdia", b"minf", b"stbl"}

    def walk(start: int, end: int) -> bool:
        pos = start
        while pos + 8 <= end:
            size, kind = struct.unpack(">I4s", data[pos : pos + 8])
            header = 8
            if size == 1 and pos + 16 <= end:
                size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
                header = 16
            elif size == 0:
                size = end - pos
            if size < header:
                return False
            if kind == b"elst":
                return True
            if kind in containers and walk(pos + header, min(pos + size, end)):
                return True
            pos += size
        return False

    return walk(0, len(data))


def probe(data: bytes, uri: str) -> VideoInfo:
    """Frame count, rate, size, longest keyframe gap and edit-list presence, decoding one frame."""
    with routed_to(log, data, uri):
        vr = _reader(data, uri)
        try:
            n = len(vr)
            first, failure = _frame(vr, 0, data)
            keys = list(vr.get_key_indices()) + [n]
            fps = float(vr.get_avg_fps())
        finally:
            del vr  # as in decode_frames
    if failure:
        raise VideoDecodeError(uri, failure)
    h, w = first.shape[:2]
    gap = max((b - a for a, b in zip(keys, keys[1:])), default=n)
    return VideoInfo(
        n_frames=n,
        fps=fps,
        height=int(h),
        width=int(w),
        keyframe_interval=int(gap),
        has_edit_list=_mp4_has_edit_list(data),
    )


# Mean absolute difference (gray levels) above which two decodes of a frame are different frames;
# decord's and FFmpeg's scalers convert colour to luma a level or two apart.
_SAME_FRAME_TOLERANCE = 3.0


def random_access_differs(data: bytes, uri: str, samples: int = 5) -> str | None:
    """What decord's random access gets wrong, or None when it returns what a sequential FFmpeg
    decode (PyAV, which applies MP4 edit lists) presents: the same frame count, and the same
    frames at ``samples`` indices spread from the first frame to the last.

    Decodes the whole video once, keeping only the sampled frames; for ``manifest check``.
    """
    import av  # PyAV is only needed here and for encoding; decord reads training clips

    vr = _reader(data, uri)
    n = len(vr)
    wanted = sorted({int(round(i)) for i in np.linspace(0, max(n - 1, 0), samples)})
    sequential: dict[int, np.ndarray] = {}
    count = 0
    try:
        with av.open(io.BytesIO(data)) as container:
            for frame in container.decode(video=0):
                if count in wanted:
                    sequential[count] = frame.to_ndarray(format="gray")
                count += 1
    except (av.error.FFmpegError, ValueError) as e:
        raise VideoDecodeError(uri, f"a sequential decode failed ({type(e).__name__})") from None
    if count != n:
        return f"decord counts {n} frames, a sequential decode {count}"
    for i, frame in zip(wanted, decode_frames(data, wanted, uri)):
        if np.abs(frame.astype(np.int16) - sequential[i]).mean() > _SAME_FRAME_TOLERANCE:
            return f"decord's frame {i} is not the frame a sequential decode presents there"
    return None
