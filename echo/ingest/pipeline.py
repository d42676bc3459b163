"""The ingest job: a folder or ``s3://`` prefix of DICOM cines and video files -> de-identified MP4 clips + manifest.

For every file under the source (any names, nested folders): a DICOM file must be a
multi-frame ultrasound cine (``echo.ingest.dicom``); a video file (AVI, MP4, MOV, MKV, any codec
FFmpeg decodes, ``echo.ingest.videofile``) is decoded whole. Both are reduced to gray frames as
they are decoded, masked to the scan sector estimated from the pixels (``echo.ingest.fan``, one
estimate for both), cropped, resized to ``--size`` and written as short-GOP H.264 MP4 at the
source frame rate with every frame kept. Other files are skipped with a reason; nothing one file
does stops the run.

Where IDs come from: a DICOM header (Patient ID, Study Instance UID, accession), or for video
files a table (``echo.ingest.table``: EchoNet layouts or a generic CSV); a video without a patient
in a table is its own patient and study.

De-identification:
- ``patient_id``, ``study_id`` and every object name are HMAC-SHA256 values (first
  ``echo.data.ids.HASH_HEX`` hex digits) under a secret key from ``ECHO_SSL_ID_KEY`` or ``--id-key-file``;
  the key is held in memory only. Ingest refuses to run without one. File names are never
  copied (a name can hold an MRN); a video's object name is the keyed hash of its content.
- Log lines and messages name a source file by its position in the sorted listing and its
  keyed path hash (``file 3/40 [9f2c...]``), because export paths often carry patient names;
  table problems are named by row number and column, never by cell value.
- The manifest keeps an allow-list of attributes (frame count, rate, rows, columns,
  manufacturer, model) and nothing else from a DICOM header or video container.

Idempotence: each clip ``videos/<id>.mp4`` is followed by ``videos/<id>.json`` holding its
row (hashes only) and the masking version; a re-run finds the JSON and reuses the row without
decoding, so it writes the same manifest. Labels, splits and table IDs are joined per run.
Labelled rows without a split from a table are split train/val/test per patient by a seeded
hash of the patient's keyed ID, so a patient's split never changes as data is added; rows
without a label go to ``unlabeled`` (a dataset's own split is kept as ``source_split``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import multiprocessing
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterable, Sequence

import numpy as np
import pandas as pd

from echo.data import storage
from echo.data.ids import ID_KEY_ENV, env_id_key, keyed_hash
from echo.data.manifest import LABELLED_SPLITS, _parse_label, describe_cell, validate
from echo.data.video import encode_mp4
from echo.ingest import dicom, fan, table, videofile
from echo.ingest.frames import DEFAULT_MAX_PIXELS, SkipFile, work_shape

__all__ = [
    "MIN_KEY_CHARS",
    "LABEL_KEYS",
    "MANIFEST_COLUMNS",
    "MASKING_VERSION",
    "IngestError",
    "IngestOptions",
    "Outcome",
    "IngestSummary",
    "load_id_key",
    "parse_size",
    "parse_splits",
    "load_labels",
    "split_for_patient",
    "ingest",
]

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 16
LABEL_KEYS = ("accession", "study_uid")
VIDEO_FOLDER = "videos"
MANIFEST_COLUMNS = (
    "video_uri",
    "patient_id",
    "study_id",
    "split",
    "label",
    "n_frames",
    "fps",
    "rows",
    "cols",
    "manufacturer",
    "model",
    "sector",
    "source_id",
)
# Bumped whenever the masking changes, so a re-run re-converts clips an older version masked.
# 2: the region box only narrows the estimated sector (it was trusted alone before).
MASKING_VERSION = 2
# Row fields kept in the JSON next to each clip; label, split and table IDs are joined per run.
_ROW_FIELDS = ("video", "kind", "patient_id", "study_id", "accession_id", "n_frames", "fps", "rows", "cols",
               "manufacturer", "model", "sector", "size", "masking")
PROGRESS_EVERY_S = 10.0


class IngestError(ValueError):
    """Options or inputs that stop ingest before it starts (no key, bad labels file or table, ...)."""


@dataclass(frozen=True)
class IngestOptions:
    """What to ingest and how. ``size`` is the output ``(H, W)`` in pixels; ``splits`` the
    train/val/test fractions for labelled patients; ``max_pixels`` the most frames x rows x
    columns a source may declare. ``labels``/``label_key`` join a labels CSV to DICOM studies;
    ``layout`` or ``table`` with the ``*_column`` options join a table to video files
    (``echo.ingest.table``); ``label_column`` names the label column of either (default
    ``label`` for a labels CSV, none for a table). ``as_unlabeled`` puts every clip in split
    ``unlabeled``."""

    src: str
    out: str
    manifest_out: str | None = None
    workers: int = 1
    size: tuple[int, int] = (112, 112)
    labels: str | None = None
    label_key: str = "accession"
    label_column: str | None = None
    splits: tuple[float, float, float] = (0.7, 0.1, 0.2)
    split_seed: int = 0
    id_key_file: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    skip_burned_in: bool = False
    layout: str | None = None
    table: str | None = None
    video_column: str | None = None
    patient_column: str | None = None
    study_column: str | None = None
    split_column: str | None = None
    as_unlabeled: bool = False

    @property
    def manifest_uri(self) -> str:
        return self.manifest_out or storage.join(self.out, "manifest.csv")


@dataclass(frozen=True)
class _Task:
    position: int
    total: int
    uri: str
    source_id: str
    out: str
    size: tuple[int, int]
    key: bytes = field(repr=False)
    max_pixels: int = DEFAULT_MAX_PIXELS
    skip_burned_in: bool = False

    @property
    def name(self) -> str:
        """How messages name this file: position and keyed path hash, never the path."""
        return f"file {self.position}/{self.total} [{self.source_id[:12]}]"


@dataclass(frozen=True)
class Outcome:
    """One source file's fate. ``status``: ``ingested`` (written now), ``done`` (found from an
    earlier run) or ``skipped`` (with ``reason`` and ``detail``). ``row`` for the first two."""

    position: int
    name: str
    source_id: str
    status: str
    reason: str = ""
    detail: str = ""
    row: dict | None = None


@dataclass
class IngestSummary:
    """Counts for the run, the skipped files with their reasons, notes on the table join, and
    the manifest written."""

    seen: int
    ingested: int
    already_done: int
    duplicates: int
    skipped: list[Outcome]
    manifest_uri: str | None
    rows: int
    split_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(o.reason for o in self.skipped).items()))

    def format(self) -> str:
        lines = [
            f"ingest: {self.seen} file(s) seen, {self.ingested + self.already_done} clip(s) in the manifest "
            f"({self.ingested} new, {self.already_done} already done), {len(self.skipped)} skipped"
        ]
        lines.extend(f"  {note}" for note in self.notes)
        for reason, count in self.skipped_by_reason.items():
            lines.append(f"  skipped {reason}: {count}")
        for o in self.skipped:
            lines.append(f"  {o.reason}: {o.detail}")
        if self.split_counts:
            lines.append("  splits: " + ", ".join(f"{k} {v}" for k, v in self.split_counts.items()))
        lines.append(f"manifest: {self.manifest_uri} ({self.rows} rows)" if self.manifest_uri else "manifest: not written (no clips)")
        return "\n".join(lines)


def load_id_key(key_file: str | None = None) -> bytes:
    """The secret for keyed hashes: the contents of ``key_file`` (local or ``s3://``, stripped)
    when given, else ``$ECHO_SSL_ID_KEY``. Raises ``IngestError`` when neither holds at least
    ``MIN_KEY_CHARS`` characters; a short key would let anyone hash candidate IDs and match them."""
    if key_file:
        try:
            key = storage.read_bytes(key_file).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise IngestError(f"cannot read the ID key file {key_file}: {type(e).__name__}") from None
        where = f"the key file {key_file}"
    else:
        key = (env_id_key() or b"").decode("utf-8")
        where = f"${ID_KEY_ENV}"
    if not key:
        raise IngestError(
            f"no ID key: set {ID_KEY_ENV} (or id_key_file in the config / --id-key-file) to a secret of at least "
            f"{MIN_KEY_CHARS} characters; patient and study IDs are replaced by keyed hashes and ingest will not run without one"
        )
    if len(key) < MIN_KEY_CHARS:
        raise IngestError(f"the ID key in {where} is {len(key)} characters; use at least {MIN_KEY_CHARS}")
    return key.encode("utf-8")


def parse_size(text: str | int) -> tuple[int, int]:
    """``"112"`` or ``"112x96"`` (H x W) -> ``(H, W)``; both even and at least 16."""
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise IngestError(f"size {text!r} is not N or HxW") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or any(v < 16 or v % 2 for v in values):
        raise IngestError(f"size {text!r}: need N or HxW, even numbers of at least 16 (H.264 4:2:0)")
    return values[0], values[1]


def parse_splits(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"0.7,0.1,0.2"`` -> train/val/test fractions (non-negative, summing to 1)."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise IngestError(f"splits {text!r} are not three numbers") from None
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise IngestError(f"splits {text!r}: need three non-negative fractions train,val,test summing to 1")
    return values  # type: ignore[return-value]


def split_for_patient(patient_id: str, fractions: tuple[float, float, float], seed: int) -> str:
    """train/val/test for a (hashed) patient ID: a uniform number from SHA-256 of seed and ID
    cut at the cumulative fractions, so the answer depends on nothing but the patient."""
    u = int(hashlib.sha256(f"{seed}:{patient_id}".encode()).hexdigest()[:15], 16) / 16**15
    edges = np.cumsum(fractions)
    for name, edge in zip(LABELLED_SPLITS, edges):
        if u < edge:
            return name
    return LABELLED_SPLITS[-1]


def load_labels(uri: str, key_kind: str, column: str, key: bytes) -> dict[str, float]:
    """Labels CSV -> ``{keyed hash of the accession or study UID: 1.0 / 0.0}``.

    The CSV needs a column named after ``key_kind`` (``accession`` or ``study_uid``) and the
    label ``column`` (1, 0 or empty = unknown). Errors name the row, never the key's value.
    """
    if key_kind not in LABEL_KEYS:
        raise IngestError(f"label key must be one of {', '.join(LABEL_KEYS)}, got {key_kind!r}")
    try:
        table = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise IngestError(f"labels file not found: {uri}") from None
    except (ValueError, OSError) as e:
        raise IngestError(f"labels file {uri} cannot be read as CSV ({type(e).__name__})") from None
    missing = [c for c in (key_kind, column) if c not in table.columns]
    if missing:
        # The header is not shown: in a file without one, the first row's cells (accession
        # numbers, study UIDs) are read as column names.
        raise IngestError(f"labels file {uri} lacks column(s) {', '.join(missing)}: its first row must name the columns "
                          f"(it has {len(table.columns)} column(s); names not shown, they may be IDs of a headerless file)")
    kind = "accession" if key_kind == "accession" else "study"
    labels: dict[str, float] = {}
    first_row: dict[str, int] = {}
    for row, (raw_key, cell) in enumerate(zip(table[key_kind], table[column]), start=1):
        value = _parse_label(cell)
        if value is None:
            raise IngestError(f"labels file {uri} row {row}: label in column {column!r} is not 1, 0 or empty: "
                              f"{describe_cell(cell)}")
        if raw_key.strip() == "":
            raise IngestError(f"labels file {uri} row {row}: empty {key_kind}")
        if np.isnan(value):
            continue
        h = keyed_hash(key, kind, raw_key.strip())
        if h in labels and labels[h] != value:
            raise IngestError(f"labels file {uri} row {row}: label differs from row {first_row[h]} for the same {key_kind}")
        labels[h] = value
        first_row.setdefault(h, row)
    return labels


def _relative(uri: str, root: str) -> str:
    root = root.rstrip("/")
    return uri[len(root) + 1 :] if uri.startswith(root + "/") else uri


def _skip(task: _Task, reason: str, detail: str) -> Outcome:
    return Outcome(task.position, task.name, task.source_id, "skipped", reason, detail)


def _clip_uris(task: _Task, video_id: str) -> tuple[str, str, str]:
    rel = f"{VIDEO_FOLDER}/{video_id}.mp4"
    return rel, storage.join(task.out, rel), storage.join(task.out, f"{VIDEO_FOLDER}/{video_id}.json")


def _earlier(task: _Task, video_uri: str, meta_uri: str) -> Outcome | None:
    """The row an earlier run wrote for this clip with the same size and masking, if any."""
    if storage.exists(meta_uri) and storage.exists(video_uri):
        row = json.loads(storage.read_bytes(meta_uri))
        if row.get("size") == f"{task.size[0]}x{task.size[1]}" and row.get("masking") == MASKING_VERSION:
            return Outcome(task.position, task.name, task.source_id, "done", row=row)
    return None


def _write_clip(task: _Task, frames: np.ndarray, regions: tuple, fps: float, video_uri: str, meta_uri: str, row: dict) -> Outcome:
    """Mask ``frames`` (``(T, h, w)`` uint8 on the working grid) to the sector, crop, resize,
    encode at ``fps`` and write the clip, then its JSON row (written last: its presence marks
    the clip complete for the next run)."""
    mask, sector = fan.sector_mask(frames, regions, task.name)
    mp4 = encode_mp4(fan.crop_to_sector(frames, mask, task.size), fps)
    row = {**row, "sector": sector, "size": f"{task.size[0]}x{task.size[1]}", "masking": MASKING_VERSION}
    try:
        storage.write_bytes(video_uri, mp4)
        storage.write_bytes(meta_uri, json.dumps({k: row[k] for k in _ROW_FIELDS}, sort_keys=True).encode())
    except OSError as e:
        return _skip(task, "write_failed", f"{task.name}: writing the clip failed ({type(e).__name__})")
    return Outcome(task.position, task.name, task.source_id, "ingested", row=row)


def _scaled_regions(regions: tuple, shape: tuple[int, int], rows: int, cols: int) -> tuple:
    """Region boxes in stored pixels -> the same boxes on the working grid ``shape`` ``(h, w)``."""
    sy, sx = shape[0] / rows, shape[1] / cols
    return tuple(
        (math.floor(x0 * sx), math.floor(y0 * sy), math.ceil((x1 + 1) * sx) - 1, math.ceil((y1 + 1) * sy) - 1)
        for x0, y0, x1, y1 in regions
    )


def _ingest_dicom(task: _Task, data: bytes) -> Outcome:
    ds = dicom.open_dataset(data, task.name)
    header = dicom.read_header(ds, task.name)
    if task.skip_burned_in and header.burned_in:
        raise SkipFile("burned_in_annotation", f"{task.name}: Burned In Annotation is YES (--skip-burned-in)")
    ids = header.ids
    instance = ids.sop_uid or "sha256:" + hashlib.sha256(data).hexdigest()
    rel, video_uri, meta_uri = _clip_uris(task, keyed_hash(task.key, "sop", instance))
    if (done := _earlier(task, video_uri, meta_uri)) is not None:
        return done
    shape = work_shape(header.rows, header.cols, task.size)
    frames = dicom.decode_frames(ds, task.name, shape, task.max_pixels)
    del ds, data
    row = {
        "video": rel,
        "kind": "dicom",
        "patient_id": keyed_hash(task.key, "patient", ids.patient_id),
        "study_id": keyed_hash(task.key, "study", ids.study_uid),
        "accession_id": keyed_hash(task.key, "accession", ids.accession) if ids.accession else "",
        **header.attributes,
    }
    regions = _scaled_regions(header.regions, shape, header.rows, header.cols)
    return _write_clip(task, frames, regions, header.fps, video_uri, meta_uri, row)


def _ingest_video(task: _Task, data: bytes) -> Outcome:
    video_id = keyed_hash(task.key, "video", hashlib.sha256(data).hexdigest())
    rel, video_uri, meta_uri = _clip_uris(task, video_id)
    if (done := _earlier(task, video_uri, meta_uri)) is not None:
        return done
    frames, header = videofile.read_video(data, task.name, task.size, task.max_pixels)
    del data
    row = {
        "video": rel,
        "kind": "video",
        # Filled from a table, or one patient and study per video, when the run joins its rows.
        "patient_id": "",
        "study_id": "",
        "accession_id": "",
        "n_frames": header.n_frames,
        "fps": round(header.fps, 4),
        "rows": header.rows,
        "cols": header.cols,
        "manufacturer": "",
        "model": "",
    }
    return _write_clip(task, frames, (), header.fps, video_uri, meta_uri, row)


def _ingest_one(task: _Task) -> Outcome:
    """Read, check, convert and write one source file (a video file or else DICOM). Never
    raises: every failure is an ``Outcome`` with a reason. Runs in a pool worker (or in the
    calling process)."""
    try:
        try:
            data = storage.read_bytes(task.uri)
        except OSError as e:
            return _skip(task, "unreadable", f"{task.name}: cannot read the file ({type(e).__name__})")
        return _ingest_video(task, data) if videofile.is_video(data) else _ingest_dicom(task, data)
    except SkipFile as e:
        return _skip(task, e.reason, e.detail)
    except Exception as e:  # a bug or an unforeseen file: report it, keep going
        return _skip(task, "error", f"{task.name}: unexpected {type(e).__name__}")


def _run_serial(tasks: Sequence[_Task]) -> Iterable[Outcome]:
    for task in tasks:
        yield _ingest_one(task)


def _pool_round(
    queue: deque[_Task], workers: int, window: int, fn: Callable[[_Task], Outcome]
) -> Generator[Outcome, None, list[_Task]]:
    """Feed ``queue`` to a fresh pool, at most ``window`` files in flight, yielding outcomes.
    Returns at the first dead worker with the files then in flight; the rest stay queued."""
    context = multiprocessing.get_context("spawn")  # workers start clean: no inherited threads or locks
    in_flight: dict = {}
    unfinished: list[_Task] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        while (queue or in_flight) and not unfinished:
            while queue and len(in_flight) < window:
                task = queue.popleft()
                in_flight[pool.submit(fn, task)] = task
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                task = in_flight.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    unfinished.append(task)
        if unfinished:
            for future, task in in_flight.items():
                try:
                    yield future.result()
                except BrokenProcessPool:
                    unfinished.append(task)
    return sorted(unfinished, key=lambda t: t.position)


def _run_pool(tasks: Sequence[_Task], workers: int, fn: Callable[[_Task], Outcome] = _ingest_one) -> Iterable[Outcome]:
    """Outcomes as workers finish. A worker that dies (a decoder crash, the OOM killer) takes
    down the pool and every file in flight: those files are retried one at a time, so only the
    one that kills its worker again is skipped (``worker_crashed``); the queue goes on."""
    queue, suspects = deque(tasks), []
    while queue:
        crashed = yield from _pool_round(queue, workers, 2 * workers, fn)
        if crashed:
            log.warning("a worker process died; %d file(s) in flight will be retried one at a time", len(crashed))
        suspects.extend(crashed)
    queue = deque(sorted(suspects, key=lambda t: t.position))
    while queue:
        for task in (yield from _pool_round(queue, 1, 1, fn)):
            yield _skip(task, "worker_crashed", f"{task.name}: the worker process died while converting it")


def _log_outcome(o: Outcome) -> None:
    if o.status == "skipped":
        log.info("skipped (%s): %s", o.reason, o.detail)
    else:
        log.info("%s: %s -> %s (%s sector)", o.name, "ingested" if o.status == "ingested" else "already done",
                 o.row["video"], o.row["sector"])


class _Progress:
    """One progress line at most every ``PROGRESS_EVERY_S`` seconds, and one at the end."""

    def __init__(self, total: int):
        self.total, self.start, self.last = total, time.monotonic(), time.monotonic()
        self.counts: Counter[str] = Counter()

    def update(self, o: Outcome) -> None:
        self.counts[o.status] += 1
        done = sum(self.counts.values())
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S or done == self.total:
            self.last = now
            rate = done / max(now - self.start, 1e-9) * 60
            log.info(
                "progress: %d/%d files (%d new, %d already done, %d skipped), %.1f files/min",
                done, self.total, self.counts["ingested"], self.counts["done"], self.counts["skipped"], rate,
            )


def _check_table(join: table.Join, spec: table.TableSpec, opts: IngestOptions) -> None:
    """Refuse a table whose split column puts one patient's labelled videos in two splits,
    before any video is decoded (the raw patient cells stay in memory)."""
    if spec.patient_column is None or spec.split_column is None or opts.as_unlabeled:
        return
    videos = {u: r.patient or f"row:{r.row}" for u, r in join.videos.items()}
    splits = {u: (r.split or "") if not math.isnan(r.label) else "unlabeled" for u, r in join.videos.items()}
    try:
        table.check_splits(videos, splits, {u: r.row for u, r in join.videos.items()}, spec.uri)
    except table.TableError as e:
        raise IngestError(str(e)) from None


def _rows_list(rows: list[int], limit: int = 20) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f", ... ({len(rows) - limit} more)" if len(rows) > limit else "")


def _join_notes(join: table.Join, spec: table.TableSpec) -> list[str]:
    notes = [f"table {spec.uri}: {join.rows} row(s), {len(join.videos)} video file(s) matched"]
    if join.not_in_table:
        notes.append(f"files not in the table: {len(join.not_in_table)} (not ingested)")
    if join.rows_without_file:
        notes.append(f"rows without a file: {len(join.rows_without_file)} (rows {_rows_list(join.rows_without_file)})")
    if join.ambiguous_rows:
        notes.append(f"rows naming several files: {len(join.ambiguous_rows)} (rows {_rows_list(join.ambiguous_rows)})")
    if join.repeated_rows:
        notes.append(f"rows repeating a video: {len(join.repeated_rows)} (rows {_rows_list(join.repeated_rows)})")
    for rows in join.conflicting.values():
        notes.append(f"rows {_rows_list(rows)} name one video with different IDs, split or label: video not ingested")
    if spec.patient_column is None:
        notes.append("no patient column: each video is its own patient and study")
    elif spec.study_column is None:
        notes.append("no study column: each video is its own study")
    return notes


def _row_ids(row: dict, key: bytes, record: table.VideoRow | None) -> dict:
    """Patient and study hashes of a video file's row: from its table record, else its own."""
    if row.get("kind", "dicom") == "dicom":
        return {}
    own = row["video"].rsplit("/", 1)[-1].split(".")[0]
    patient = record.patient if record is not None and record.patient else None
    study = record.study if record is not None and record.study else None
    return {
        "patient_id": keyed_hash(key, "patient", patient) if patient else keyed_hash(key, "patient", f"video:{own}"),
        "study_id": keyed_hash(key, "study", study) if study else keyed_hash(key, "study", f"video:{own}"),
    }


def _split(label: float | None, source_split: str | None, patient_id: str, opts: IngestOptions) -> str:
    if opts.as_unlabeled or label is None or math.isnan(label):
        return "unlabeled"
    return source_split or split_for_patient(patient_id, opts.splits, opts.split_seed)


def _manifest_table(rows: list[dict], opts: IngestOptions, with_source_split: bool) -> pd.DataFrame:
    """Manifest rows (``video_uri`` relative to the manifest when it lies above the clips)."""
    base = opts.manifest_uri.rsplit("/", 1)[0] if "/" in opts.manifest_uri else "."
    out = []
    for r in rows:
        video_uri = storage.join(opts.out, r["video"])
        link = _relative(video_uri, base) if video_uri.startswith(base.rstrip("/") + "/") else video_uri
        label = r["label"]
        entry = {
            "video_uri": link,
            "patient_id": r["patient_id"],
            "study_id": r["study_id"],
            "split": _split(label, r.get("source_split"), r["patient_id"], opts),
            "label": "" if label is None or math.isnan(label) else str(int(label)),
            "n_frames": int(r["n_frames"]),
            "fps": f"{float(r['fps']):.4f}",
            "rows": int(r["rows"]),
            "cols": int(r["cols"]),
            "manufacturer": r["manufacturer"],
            "model": r["model"],
            "sector": r["sector"],
            "source_id": r["source_id"],
        }
        if with_source_split:
            entry["source_split"] = r.get("source_split") or ""
        out.append(entry)
    columns = list(MANIFEST_COLUMNS) + (["source_split"] if with_source_split else [])
    frame = pd.DataFrame(out, columns=columns)
    return frame.sort_values("video_uri", kind="stable").reset_index(drop=True)


def _sources(opts: IngestOptions) -> list[str]:
    out_root = opts.out.rstrip("/") + "/"
    return [u for u in storage.list_prefix(opts.src) if not u.startswith(out_root) and u != opts.manifest_uri]


def ingest(opts: IngestOptions) -> IngestSummary:
    """Run the ingest job (see the module docstring); returns the summary, also logged.

    Raises ``IngestError`` before any work for a missing key, bad options, an unreadable
    labels file or table, a table whose splits leak a patient, or an empty source.
    """
    started = time.monotonic()
    key = load_id_key(opts.id_key_file)
    if opts.label_key not in LABEL_KEYS:
        raise IngestError(f"label key must be one of {', '.join(LABEL_KEYS)}, got {opts.label_key!r}")
    parse_splits(opts.splits)
    parse_size(f"{opts.size[0]}x{opts.size[1]}")
    if opts.workers < 1:
        raise IngestError(f"workers must be at least 1, got {opts.workers}")
    if opts.max_pixels < 1:
        raise IngestError(f"max pixels must be positive, got {opts.max_pixels}")
    if opts.labels and (opts.layout or opts.table):
        raise IngestError("--labels joins DICOM studies; with --layout or --table, labels come from --label-column")
    labels = load_labels(opts.labels, opts.label_key, opts.label_column or "label", key) if opts.labels else {}
    columns = {"video_column": opts.video_column, "patient_column": opts.patient_column, "study_column": opts.study_column,
               "split_column": opts.split_column, "label_column": opts.label_column}
    try:
        spec = table.table_spec(opts.src, opts.layout, opts.table, columns)
    except table.TableError as e:
        raise IngestError(str(e)) from None
    listed = _sources(opts)
    join = None
    notes: list[str] = []
    sources = listed
    if spec is not None:
        try:
            join = table.join_table(spec, listed, opts.src)
        except table.TableError as e:
            raise IngestError(str(e)) from None
        _check_table(join, spec, opts)
        notes = _join_notes(join, spec)
        sources = sorted(join.videos)
    if not sources:
        raise IngestError(f"no files under {opts.src}" if spec is None else f"no file under {opts.src} matches a row of {spec.uri}")
    n = len(sources)
    tasks = [
        _Task(i, n, uri, keyed_hash(key, "path", _relative(uri, opts.src)), opts.out, tuple(opts.size), key,
              opts.max_pixels, opts.skip_burned_in)
        for i, uri in enumerate(sources, start=1)
    ]
    log.info("ingest: %d file(s) to convert, %d worker(s), clips %dx%d", n, opts.workers, *opts.size)
    runner = _run_serial(tasks) if opts.workers == 1 or n == 1 else _run_pool(tasks, opts.workers)
    outcomes: list[Outcome] = []
    progress = _Progress(n)
    for o in runner:
        _log_outcome(o)
        progress.update(o)
        outcomes.append(o)
    outcomes.sort(key=lambda o: o.position)

    rows: list[dict] = []
    skipped: list[Outcome] = []
    first_of_video: dict[str, Outcome] = {}
    duplicates = 0
    for o in outcomes:
        if o.status == "skipped":
            skipped.append(o)
            continue
        if o.row["video"] in first_of_video:
            duplicates += 1
            same = "SOP instance" if o.row.get("kind", "dicom") == "dicom" else "video content"
            skipped.append(
                Outcome(o.position, o.name, o.source_id, "skipped", "duplicate",
                        f"{o.name}: same {same} as {first_of_video[o.row['video']].name}")
            )
            continue
        first_of_video[o.row["video"]] = o
        record = join.videos.get(sources[o.position - 1]) if join is not None else None
        row = {**o.row, "source_id": o.source_id, **_row_ids(o.row, key, record)}
        if record is not None:
            row["label"], row["source_split"] = record.label, record.split
        else:
            label_key = row["accession_id"] if opts.label_key == "accession" else row["study_id"]
            row["label"] = labels.get(label_key) if label_key else None
        rows.append(row)

    if join is None and any(r.get("kind") == "video" for r in rows):
        notes.append("video files without a table: each is its own patient and study, in split unlabeled")
    manifest_uri = None
    manifest = _manifest_table(rows, opts, with_source_split=join is not None)
    if len(manifest):
        errors, _ = validate(manifest.astype(str), opts.manifest_uri)
        if errors:
            raise IngestError("the manifest would be invalid: " + "; ".join(str(e) for e in errors[:10]))
        manifest_uri = opts.manifest_uri
        storage.write_bytes(manifest_uri, manifest.to_csv(index=False).encode())
    done = sum(o.status == "done" for o in first_of_video.values())
    summary = IngestSummary(
        seen=len(listed),
        ingested=len(rows) - done,
        already_done=done,
        duplicates=duplicates,
        skipped=skipped,
        manifest_uri=manifest_uri,
        rows=len(manifest),
        split_counts={k: int(v) for k, v in manifest["split"].value_counts().sort_index().items()},
        notes=notes,
        seconds=time.monotonic() - started,
    )
    log.info("%s", summary.format().splitlines()[0])
    for reason, count in summary.skipped_by_reason.items():
        log.info("  skipped %s: %d", reason, count)
    return summary
