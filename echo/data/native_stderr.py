"""What native decoders write to the process's stderr, routed through a logger instead.

decord (dmlc's ``LOG``) and the FFmpeg libraries it bundles write straight to file
descriptor 2: fifty lines of ``[h264 @ 0x...] Invalid NAL unit size`` for one corrupt video,
and, for input they cannot open, decord's ``ERROR opening:`` followed by the input itself,
which for a video read from memory is the file's bytes. ``routed_to(logger, data)`` points
descriptor 2 at an in-memory file while a decoder runs and then logs what was written, at
debug level, one record per line, with any line that holds a run of 8 or more bytes of
``data`` replaced by a note (a decoder's message never carries the file's content into a
log). Lines that do not look like a decoder's (another thread's output in the meantime) go
back to stderr, screened the same way.

Descriptor 2 is the process's: one routed section runs at a time (a lock), so decodes in
several threads of one process take turns. The loader decodes in worker processes, one
decode at a time each.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from typing import Iterator

__all__ = ["routed_to", "screened"]

MAX_LINES = 20  # logged per section; the rest are counted
_RUN = 8  # a line sharing this many consecutive bytes with the file is not shown
_DECODER_LINE = re.compile(rb"^(\[\d\d:\d\d:\d\d\] |\[[\w,.:-]+ @ 0x[0-9a-f]+\] |\[\w+\] )")
_lock = threading.Lock()
_sink: dict[int, int] = {}  # pid -> this process's capture file descriptor


def _capture_fd() -> int:
    """This process's capture file (a forked child must not share its parent's file offset)."""
    fd = _sink.get(os.getpid())
    if fd is None:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("echo-native-stderr", os.MFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            fd = os.dup(tempfile.TemporaryFile().fileno())
        _sink.clear()
        _sink[os.getpid()] = fd
    return fd


def screened(line: bytes, data: bytes) -> str:
    """``line`` as text, or a note in its place when it holds a run of ``_RUN`` bytes of ``data``."""
    note = "[a line holding bytes of the input, not shown]"
    if line and (line in data if len(line) < _RUN else any(
            line[i : i + _RUN] in data for i in range(0, len(line) - _RUN + 1, _RUN // 2))):
        return note
    return line.decode("utf-8", "replace")


@contextlib.contextmanager
def routed_to(log: logging.Logger, data: bytes, label: str) -> Iterator[None]:
    """Send what is written to descriptor 2 inside the block to ``log.debug`` (decoder lines,
    prefixed with ``label``) or back to stderr (other lines), never showing bytes of ``data``."""
    with _lock:
        sys.stderr.flush()
        sink = _capture_fd()
        saved = os.dup(2)
        os.dup2(sink, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            size = os.lseek(sink, 0, os.SEEK_CUR)
            written = b""
            if size:
                os.lseek(sink, 0, os.SEEK_SET)
                written = os.read(sink, size)
                os.ftruncate(sink, 0)
                os.lseek(sink, 0, os.SEEK_SET)
    if written:
        _route(log, written, data, label)


def _route(log: logging.Logger, written: bytes, data: bytes, label: str) -> None:
    decoder, other = [], []
    in_decoder = False
    for line in written.splitlines():
        if _DECODER_LINE.match(line):
            in_decoder = True
        elif not line.strip():
            continue
        # a line without a decoder prefix right after one continues it (decord writes the input there)
        (decoder if in_decoder else other).append(line)
    for line in decoder[:MAX_LINES]:
        log.debug("%s: decoder: %s", label, screened(line, data))
    if len(decoder) > MAX_LINES:
        log.debug("%s: decoder: %d more lines", label, len(decoder) - MAX_LINES)
    if other:
        sys.stderr.write("".join(screened(line, data) + "\n" for line in other))
        sys.stderr.flush()
