"""Decoding untrusted videos in a child process with memory and time limits.

The REST server (``echo.serve.pyfunc``) decodes the bytes clients point it at. A hostile file
(a huge declared frame size, a container or codec that drives FFmpeg into a long loop or a
crash) must not take the server down, so the decode runs in a child process
(``python -m echo.serve.sandbox``, the server's own ``sys.path``):

- memory: the child's address space (``RLIMIT_AS``) may grow by at most ``memory_mb`` beyond
  what it holds once its imports are done; an allocation past that fails inside the child;
- time: a decode that takes longer than ``timeout_s`` is abandoned and the child killed;
- a child that dies (killed by a limit, a crash in the decoder) is replaced by a fresh one
  for the next request.

Every failure comes back as :class:`~echo.data.video.VideoDecodeError` naming the video, so
the server answers that row with a readable error and keeps serving. The child answers with a
small JSON header and raw float32 bytes whose shape the parent checks (nothing is unpickled
from the process that touched the hostile bytes). One child per server process; requests
within a process take turns (a lock).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import select
import subprocess
import sys
import threading
import time
from typing import IO, Any

import numpy as np
import torch

from echo.data.video import VideoDecodeError, encode_mp4
from echo.model.preprocessing import Preprocessing
from echo.model.scoring import video_clips

__all__ = ["DEFAULT_MEMORY_MB", "DEFAULT_TIMEOUT_S", "IsolatedDecoder"]

log = logging.getLogger(__name__)

DEFAULT_MEMORY_MB = 1024
DEFAULT_TIMEOUT_S = 60.0
_START_TIMEOUT_S = 120.0  # the child imports torch and the decoder before it answers
_HEADER_MAX = 1 << 16


def _address_space() -> int:
    """This process's virtual memory size in bytes (``VmSize``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmSize not found in /proc/self/status")


def _send(out: IO[bytes], header: dict[str, Any], payload: bytes = b"") -> None:
    """One message: 8-byte big-endian header length, the JSON header, ``header["size"]`` bytes."""
    text = json.dumps({**header, "size": len(payload)}).encode()
    out.write(len(text).to_bytes(8, "big") + text + payload)
    out.flush()


def _read_exact(stream: IO[bytes], n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def main() -> None:
    """The child: limit its own address space, then decode requests from stdin until it closes."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the answers
    memory_mb = int(sys.argv[1])
    torch.set_num_threads(1)
    # Warm up first: the decoder loads its libraries on first use, which the limit must not count.
    video_clips(Preprocessing(2, 1, 1, (16, 16)), encode_mp4(np.zeros((2, 16, 16), np.uint8), fps=25), "warm-up")
    limit = _address_space() + memory_mb * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    over_limit = f"decoding needs more than the {memory_mb} MB of memory allowed"
    _send(out, {"status": "ready"})
    inp = sys.stdin.buffer
    while True:
        size = _read_exact(inp, 8)
        if size is None:
            return
        request = json.loads(_read_exact(inp, int.from_bytes(size, "big")) or b"{}")
        data = _read_exact(inp, request["size"]) or b""
        uri = request["uri"]
        try:
            clips = video_clips(Preprocessing(**request["preprocessing"]), data, uri).numpy()
            _send(out, {"status": "ok", "shape": list(clips.shape)}, clips.astype("<f4").tobytes())
        except VideoDecodeError as e:  # the decoder's own MemoryError arrives wrapped in it
            memory = "MemoryError" in e.reason
            _send(out, {"status": "error", "reason": over_limit if memory else e.reason})
        except MemoryError:
            _send(out, {"status": "error", "reason": over_limit})
        except Exception as e:  # anything else the decoder raises on hostile bytes
            _send(out, {"status": "error", "reason": f"not a readable video ({type(e).__name__})"})
        del data


class _Timeout(Exception):
    pass


class IsolatedDecoder:
    """:func:`echo.model.scoring.video_clips` in a child process with limits (see the module
    docstring). ``memory_mb``: address space the decode may add; ``timeout_s``: wall-clock
    seconds per video."""

    def __init__(self, memory_mb: int = DEFAULT_MEMORY_MB, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.memory_mb = int(memory_mb)
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        """Start the child now (it is started on first use otherwise)."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._stop()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the server's code
        proc = subprocess.Popen([sys.executable, "-m", "echo.serve.sandbox", str(self.memory_mb)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._proc = proc
        try:
            header, _ = self._receive(time.monotonic() + _START_TIMEOUT_S, 0)
        except (_Timeout, EOFError):
            self._stop()
            raise RuntimeError("the isolated decoding process did not start") from None
        if header.get("status") != "ready":
            self._stop()
            raise RuntimeError("the isolated decoding process did not start")
        return proc

    def _read(self, n: int, deadline: float) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        chunks, got = [], 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise _Timeout()
            chunk = os.read(fd, min(n - got, 1 << 20))
            if not chunk:
                raise EOFError()
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _receive(self, deadline: float, max_payload: int) -> tuple[dict[str, Any], bytes]:
        n = int.from_bytes(self._read(8, deadline), "big")
        if n > _HEADER_MAX:
            raise EOFError()
        header = json.loads(self._read(n, deadline))
        size = int(header.get("size", 0))
        if size > max_payload:
            raise EOFError()
        return header, self._read(size, deadline)

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()

    def clips(self, pre: Preprocessing, data: bytes, uri: str) -> torch.Tensor:
        """The clips ``(K, 1, T, H, W)`` float32 of one video's bytes, decoded in the child.

        Raises :class:`~echo.data.video.VideoDecodeError` naming ``uri`` for an unreadable
        video, one that needs more memory or time than allowed, or one that kills the child.
        ``pre.frame_size`` must be set (it bounds the answer's size).
        """
        if pre.frame_size is None:
            raise ValueError("IsolatedDecoder needs a preprocessing with a frame_size")
        expected = [pre.num_clips, 1, pre.clip_len, *pre.frame_size]
        with self._lock:
            proc = self._ensure()
            request = {"uri": uri, "preprocessing": {"clip_len": pre.clip_len, "num_clips": pre.num_clips,
                                                     "stride": pre.stride, "frame_size": list(pre.frame_size)}}
            try:
                assert proc.stdin is not None
                _send(proc.stdin, request, data)
                header, payload = self._receive(time.monotonic() + self.timeout_s, int(np.prod(expected)) * 4)
            except (_Timeout, EOFError, OSError, ValueError) as e:
                code = proc.poll()
                self._stop()
                self.restarts += 1
                if isinstance(e, _Timeout):
                    reason = f"decoding took longer than {self.timeout_s:g} s"
                else:
                    reason = f"the decoding process died (exit code {code}); the file may need more than the memory allowed"
                log.warning("isolated decode of %s: %s; decoder restarted", uri, reason)
                raise VideoDecodeError(uri, reason) from None
        if header.get("status") != "ok":
            raise VideoDecodeError(uri, str(header.get("reason", "not a readable video")))
        if header.get("shape") != expected:
            raise VideoDecodeError(uri, "the decoding process answered clips of the wrong shape")
        return torch.from_numpy(np.frombuffer(payload, dtype="<f4").reshape(expected).copy())

    def close(self) -> None:
        """Stop the child."""
        with self._lock:
            self._stop()


if __name__ == "__main__":
    main()
