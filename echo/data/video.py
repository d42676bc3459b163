"""Video bytes <-> frames: H.264 encoding (PyAV) and frame-accurate decoding (decord) in memory.

Canonical storage format: H.264 in MP4, yuv420p, a keyframe every ``KEYFRAME_INTERVAL``
frames, no B-frames and no edit lists, because decord seeks slowly on long GOPs and returns
wrong frames on B-frame files and MP4 edit lists.

Frames are grayscale ``uint8`` arrays of shape ``(T, H, W)``; echo is grayscale, and a
colour source is converted with ITU-R BT.601 luma.
"""

from __future__ import annotations

import functools
import io
import platform
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "KEYFRAME_INTERVAL",
    "VideoDecodeError",
    "VideoInfo",
    "encode_mp4",
    "decode_frames",
    "probe",
    "random_access_differs",
]

KEYFRAME_INTERVAL = 8
MAX_KEYFRAME_INTERVAL_OK = 16
# decord replaces a frame it cannot decode with the last good one unless told otherwise; a
# threshold this small (a fraction of the frame count) makes the first such frame an error.
_FAULT_TOLERANCE = 1e-9


class VideoDecodeError(RuntimeError):
    """A video that cannot be decoded; the message names its URI and the reason."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason
        super().__init__(f"cannot decode {uri}: {reason}")

    def __reduce__(self):  # picklable across Ray and loader processes
        return (type(self), (self.uri, self.reason))


@dataclass(frozen=True)
class VideoInfo:
    n_frames: int
    fps: float
    height: int
    width: int
    keyframe_interval: int  # the longest gap between keyframes, in frames
    has_edit_list: bool


def _decord():
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


def _reader(data: bytes, uri: str):
    if not data:
        raise VideoDecodeError(uri, "empty object")
    decord = _decord()
    try:
        return decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1, fault_tol=_FAULT_TOLERANCE)
    except Exception as e:  # decord raises DECORDError (a RuntimeError) or its own types
        raise VideoDecodeError(uri, f"not a readable video ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


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
    vr = _reader(data, uri)
    n = len(vr)
    if n < 1:
        raise VideoDecodeError(uri, "the video has no frames")
    idx = [int(i) for i in (indices(n) if callable(indices) else indices)]
    if not idx:
        raise ValueError("no frame indices given")
    bad = [i for i in idx if i < 0 or i >= n]
    if bad:
        raise VideoDecodeError(uri, f"frame index {bad[0]} outside the video's {n} frames")
    frames = []
    for i in idx:  # ascending distinct indices decode each frame once, seeking only across keyframes
        try:
            frame = vr[i].asnumpy()
        except Exception as e:
            raise VideoDecodeError(uri, f"decoding frames failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        frames.append(_rgb(frame, uri))
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
    """Frame count, rate, size, longest keyframe gap and edit-list presence, without decoding frames."""
    vr = _reader(data, uri)
    n = len(vr)
    h, w = vr[0].shape[:2] if n else (0, 0)
    keys = list(vr.get_key_indices()) + [n]
    gap = max((b - a for a, b in zip(keys, keys[1:])), default=n)
    return VideoInfo(
        n_frames=n,
        fps=float(vr.get_avg_fps()),
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
