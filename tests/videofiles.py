"""Small echo video files for the ingest tests, built with PyAV from pydicom's real cine
(tests/dicomfiles.py) in the codecs and containers clinics and public data sets use: MJPEG and
MPEG-4 part 2 in AVI, H.264 with B-frames and an MP4 edit list, H.264 in MOV and MKV; colour or
grey; 112x112 or 640x480 with a fake patient name burned into a corner."""

from __future__ import annotations

import io
import struct

import av
import numpy as np
from PIL import Image, ImageDraw

from dicomfiles import real_rgb

__all__ = ["CODECS", "BURNED_TEXT", "TEXT_CORNER", "echo_frames", "write_video", "encode_as", "has_edit_list", "b_frames", "decode_all", "trim_edit_list"]

# (container format, codec, pixel format, codec options)
CODECS = {
    "mjpeg.avi": ("avi", "mjpeg", "yuvj420p", {"q:v": "3"}),
    "mpeg4.avi": ("avi", "mpeg4", "yuv420p", {"q:v": "3", "g": "250"}),
    "h264-bframes.mp4": ("mp4", "libx264", "yuv420p", {"x264-params": "bframes=3:keyint=250:min-keyint=250:scenecut=0"}),
    "h264.mov": ("mov", "libx264", "yuv420p", {"x264-params": "keyint=60"}),
    "h264.mkv": ("matroska", "libx264", "yuv420p", {"x264-params": "keyint=60"}),
}
BURNED_TEXT = "ZZTEST^SECRET 12345"
TEXT_CORNER = (0.0, 0.0, 0.45, 0.12)  # x0, y0, x1, y1 as fractions of the frame: the top-left corner


def echo_frames(size: tuple[int, int], colour: bool, n_frames: int = 30, text: bool = True) -> np.ndarray:
    """The real cine resized to ``size`` ``(H, W)``, as ``(T, H, W, 3)`` RGB (``colour``) or
    ``(T, H, W)`` grey uint8, with ``BURNED_TEXT`` in white in the top-left corner (outside the fan)."""
    h, w = size
    out = []
    for rgb in real_rgb(n_frames):
        img = Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR)
        if text:
            draw = ImageDraw.Draw(img)
            x0, y0, x1, y1 = (int(f * d) for f, d in zip(TEXT_CORNER, (w, h, w, h)))
            draw.rectangle((x0, y0, x1, y1), fill=(0, 0, 0))
            draw.text((x0 + 2, y0 + 1), BURNED_TEXT, fill=(255, 255, 255))
        out.append(np.asarray(img if colour else img.convert("L")))
    return np.stack(out)


def write_video(frames: np.ndarray, kind: str, fps: float = 30.0) -> bytes:
    """Encode ``frames`` (``(T, H, W, 3)`` RGB or ``(T, H, W)`` grey uint8) as ``kind`` (a key of CODECS)."""
    return encode_as(frames, *CODECS[kind], fps=fps)


def encode_as(frames: np.ndarray, fmt: str, codec: str, pix_fmt: str, options: dict | None = None,
              fps: float = 30.0) -> bytes:
    """Encode ``frames`` (as in ``write_video``) in container ``fmt`` with ``codec`` (FFmpeg names)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=round(fps) if float(fps).is_integer() else fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        stream.options = dict(options or {})
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24" if f.ndim == 3 else "gray")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode_all(data: bytes) -> np.ndarray:
    """Every frame in presentation order as ``(T, H, W)`` grey uint8 (FFmpeg, sequential)."""
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="gray") for f in c.decode(video=0)])


def b_frames(data: bytes) -> int:
    """How many decoded frames are B-frames."""
    with av.open(io.BytesIO(data)) as c:
        return sum(int(f.pict_type) == int(av.video.frame.PictureType.B) for f in c.decode(video=0))


def has_edit_list(data: bytes) -> bool:
    """Whether an MP4/MOV holds an ``elst`` box (a flat search of the box tree)."""
    containers = {b"moov", b"trak", b"edts"}

    def walk(pos: int, end: int) -> bool:
        while pos + 8 <= end:
            size, kind = struct.unpack(">I4s", data[pos : pos + 8])
            if size < 8:
                return False
            if kind == b"elst" or (kind in containers and walk(pos + 8, pos + size)):
                return True
            pos += size
        return False

    return walk(0, len(data))


def trim_edit_list(data: bytes, frames: int, fps: float = 30.0) -> bytes:
    """An MP4 whose (single, version 0) edit list starts ``frames`` frames later: FFmpeg then
    presents ``frames`` fewer frames, while the samples stay in the file."""
    out = bytearray(data)
    elst = out.find(b"elst")
    mdhd = out.find(b"mdhd")
    assert elst > 0 and out[elst + 4] == 0 and out[mdhd + 4] == 0, "needs version-0 elst and mdhd boxes"
    timescale = struct.unpack(">I", out[mdhd + 16 : mdhd + 20])[0]
    media_time = struct.unpack(">i", out[elst + 16 : elst + 20])[0]
    out[elst + 16 : elst + 20] = struct.pack(">i", media_time + round(frames * timescale / fps))
    return bytes(out)
