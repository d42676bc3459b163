"""The ingest job: a folder or ``s3://`` prefix of DICOM files -> de-identified MP4 clips + manifest.

For every file under the source (any names, nested folders): parse it, keep multi-frame
ultrasound cines, decode, mask everything outside the scan sector, crop and resize, and write
an H.264 MP4 at the true frame rate (``echo.ingest.dicom`` does the pixels). Other files are skipped
with a reason; nothing one file does stops the run.

De-identification:
- ``patient_id``, ``study_id`` and every object name are HMAC-SHA256 values (first
  ``HASH_HEX`` hex digits) under a secret key from ``ECHO_SSL_ID_KEY`` or ``--id-key-file``;
  the key is held in memory only. Ingest refuses to run without one.
- Log lines and messages name a source file by its position in the sorted listing and its
  keyed path hash (``file 3/40 [9f2c...]``), because export paths often carry patient names.
- The manifest keeps an allow-list of attributes (frame count, rate, rows, columns,
  manufacturer, model) and nothing else from the DICOM header.

Idempotence: each clip ``videos/<id>.mp4`` is followed by ``videos/<id>.json`` holding its
manifest row (hashes only); a re-run finds the JSON and reuses the row without decoding, so
it writes the same manifest. Labelled rows are split train/val/test per patient by a seeded
hash of the patient's keyed ID, so a patient's split never changes as data is added.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import multiprocessing
import os
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterable, Sequence

import numpy as np
import pandas as pd

from echo.ingest import dicom
from echo.data import storage
from echo.data.manifest import LABELLED_SPLITS, _parse_label, describe_cell
from echo.data.video import encode_mp4

__all__ = [
    "ID_KEY_ENV",
    "MIN_KEY_CHARS",
    "HASH_HEX",
    "LABEL_KEYS",
    "MANIFEST_COLUMNS",
    "IngestError",
    "IngestOptions",
    "Outcome",
    "IngestSummary",
    "load_id_key",
    "keyed_hash",
    "parse_size",
    "parse_splits",
    "load_labels",
    "split_for_patient",
    "ingest",
]

log = logging.getLogger(__name__)

ID_KEY_ENV = "ECHO_SSL_ID_KEY"
MIN_KEY_CHARS = 16
HASH_HEX = 32
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
# Row fields kept in the JSON next to each clip; label and split are joined per run.
_ROW_FIELDS = ("video", "patient_id", "study_id", "accession_id", "n_frames", "fps", "rows", "cols",
               "manufacturer", "model", "sector", "size")


class IngestError(ValueError):
    """Options or inputs that stop ingest before it starts (no key, bad labels file, ...)."""


@dataclass(frozen=True)
class IngestOptions:
    """What to ingest and how. ``size`` is the output ``(H, W)`` in pixels; ``splits`` the
    train/val/test fractions for labelled patients."""

    src: str
    out: str
    manifest_out: str | None = None
    workers: int = 1
    size: tuple[int, int] = (112, 112)
    labels: str | None = None
    label_key: str = "accession"
    label_column: str = "label"
    splits: tuple[float, float, float] = (0.7, 0.1, 0.2)
    split_seed: int = 0
    id_key_file: str | None = None

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
    """Counts for the run, the skipped files with their reasons, and the manifest written."""

    seen: int
    ingested: int
    already_done: int
    duplicates: int
    skipped: list[Outcome]
    manifest_uri: str | None
    rows: int
    split_counts: dict[str, int] = field(default_factory=dict)

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(o.reason for o in self.skipped).items()))

    def format(self) -> str:
        lines = [
            f"ingest: {self.seen} file(s) seen, {self.ingested + self.already_done} clip(s) in the manifest "
            f"({self.ingested} new, {self.already_done} already done), {len(self.skipped)} skipped"
        ]
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
        key = os.environ.get(ID_KEY_ENV, "").strip()
        where = f"${ID_KEY_ENV}"
    if not key:
        raise IngestError(
            f"no ID key: set {ID_KEY_ENV} (or id_key_file in the config / --id-key-file) to a secret of at least "
            f"{MIN_KEY_CHARS} characters; patient and study IDs are replaced by keyed hashes and ingest will not run without one"
        )
    if len(key) < MIN_KEY_CHARS:
        raise IngestError(f"the ID key in {where} is {len(key)} characters; use at least {MIN_KEY_CHARS}")
    return key.encode("utf-8")


def keyed_hash(key: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256 of ``kind:value`` under ``key``, first ``HASH_HEX`` hex digits. ``kind``
    (``patient``, ``study``, ``accession``, ``sop``, ``path``) keeps the ID spaces apart."""
    return hmac.new(key, f"{kind}:{value}".encode("utf-8"), hashlib.sha256).hexdigest()[:HASH_HEX]


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


def _ingest_one(task: _Task) -> Outcome:
    """Read, check, convert and write one source file. Never raises: every failure is an
    ``Outcome`` with a reason. Runs in a pool worker (or in the calling process)."""
    try:
        try:
            data = storage.read_bytes(task.uri)
        except OSError as e:
            return _skip(task, "unreadable", f"{task.name}: cannot read the file ({type(e).__name__})")
        ds = dicom.open_dataset(data, task.name)
        header = dicom.read_header(ds, task.name)
        ids = header.ids
        instance = ids.sop_uid or "sha256:" + hashlib.sha256(data).hexdigest()
        video_id = keyed_hash(task.key, "sop", instance)
        rel = f"{VIDEO_FOLDER}/{video_id}.mp4"
        video_uri, meta_uri = storage.join(task.out, rel), storage.join(task.out, f"{VIDEO_FOLDER}/{video_id}.json")
        size = f"{task.size[0]}x{task.size[1]}"
        if storage.exists(meta_uri) and storage.exists(video_uri):
            row = json.loads(storage.read_bytes(meta_uri))
            if row.get("size") == size:
                return Outcome(task.position, task.name, task.source_id, "done", row=row)
        frames = dicom.decode_frames(ds, task.name)
        del ds, data
        mask, sector = dicom.sector_mask(frames, header.regions, task.name)
        clip = dicom.crop_to_sector(frames, mask, task.size)
        mp4 = encode_mp4(clip, header.fps)
        row = {
            "video": rel,
            "patient_id": keyed_hash(task.key, "patient", ids.patient_id),
            "study_id": keyed_hash(task.key, "study", ids.study_uid),
            "accession_id": keyed_hash(task.key, "accession", ids.accession) if ids.accession else "",
            **header.attributes,
            "sector": sector,
            "size": size,
        }
        try:
            storage.write_bytes(video_uri, mp4)
            # Written last: its presence marks the clip as complete for the next run.
            storage.write_bytes(meta_uri, json.dumps({k: row[k] for k in _ROW_FIELDS}, sort_keys=True).encode())
        except OSError as e:
            return _skip(task, "write_failed", f"{task.name}: writing the clip failed ({type(e).__name__})")
        return Outcome(task.position, task.name, task.source_id, "ingested", row=row)
    except dicom.DicomSkip as e:
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


def _manifest_table(rows: list[dict], opts: IngestOptions, labels: dict[str, float]) -> pd.DataFrame:
    base = opts.manifest_uri.rsplit("/", 1)[0] if "/" in opts.manifest_uri else "."
    out = []
    for r in rows:
        video_uri = storage.join(opts.out, r["video"])
        link = _relative(video_uri, base) if video_uri.startswith(base.rstrip("/") + "/") else video_uri
        label_key = r["accession_id"] if opts.label_key == "accession" else r["study_id"]
        label = labels.get(label_key) if label_key else None
        split = split_for_patient(r["patient_id"], opts.splits, opts.split_seed) if label is not None else "unlabeled"
        out.append(
            {
                "video_uri": link,
                "patient_id": r["patient_id"],
                "study_id": r["study_id"],
                "split": split,
                "label": "" if label is None else str(int(label)),
                "n_frames": int(r["n_frames"]),
                "fps": f"{float(r['fps']):.4f}",
                "rows": int(r["rows"]),
                "cols": int(r["cols"]),
                "manufacturer": r["manufacturer"],
                "model": r["model"],
                "sector": r["sector"],
                "source_id": r["source_id"],
            }
        )
    table = pd.DataFrame(out, columns=list(MANIFEST_COLUMNS))
    return table.sort_values("video_uri", kind="stable").reset_index(drop=True)


def ingest(opts: IngestOptions) -> IngestSummary:
    """Run the ingest job (see the module docstring); returns the summary, also logged.

    Raises ``IngestError`` before any work for a missing key, bad options, an unreadable
    labels file or an empty source.
    """
    key = load_id_key(opts.id_key_file)
    if opts.label_key not in LABEL_KEYS:
        raise IngestError(f"label key must be one of {', '.join(LABEL_KEYS)}, got {opts.label_key!r}")
    parse_splits(opts.splits)
    parse_size(f"{opts.size[0]}x{opts.size[1]}")
    if opts.workers < 1:
        raise IngestError(f"workers must be at least 1, got {opts.workers}")
    labels = load_labels(opts.labels, opts.label_key, opts.label_column, key) if opts.labels else {}
    out_root = opts.out.rstrip("/") + "/"
    sources = [
        u for u in storage.list_prefix(opts.src) if not u.startswith(out_root) and u != opts.manifest_uri
    ]
    if not sources:
        raise IngestError(f"no files under {opts.src}")
    n = len(sources)
    tasks = [
        _Task(i, n, uri, keyed_hash(key, "path", _relative(uri, opts.src)), opts.out, tuple(opts.size), key)
        for i, uri in enumerate(sources, start=1)
    ]
    log.info("ingest: %d file(s) under the source, %d worker(s), clips %dx%d", n, opts.workers, *opts.size)
    runner = _run_serial(tasks) if opts.workers == 1 or n == 1 else _run_pool(tasks, opts.workers)
    outcomes: list[Outcome] = []
    for o in runner:
        _log_outcome(o)
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
            skipped.append(
                Outcome(o.position, o.name, o.source_id, "skipped", "duplicate",
                        f"{o.name}: same SOP instance as {first_of_video[o.row['video']].name}")
            )
            continue
        first_of_video[o.row["video"]] = o
        rows.append({**o.row, "source_id": o.source_id})

    manifest_uri = None
    table = _manifest_table(rows, opts, labels)
    if len(table):
        manifest_uri = opts.manifest_uri
        storage.write_bytes(manifest_uri, table.to_csv(index=False).encode())
    done = sum(o.status == "done" for o in first_of_video.values())
    summary = IngestSummary(
        seen=n,
        ingested=len(rows) - done,
        already_done=done,
        duplicates=duplicates,
        skipped=skipped,
        manifest_uri=manifest_uri,
        rows=len(table),
        split_counts={k: int(v) for k, v in table["split"].value_counts().sort_index().items()},
    )
    log.info("%s", summary.format().splitlines()[0])
    for reason, count in summary.skipped_by_reason.items():
        log.info("  skipped %s: %d", reason, count)
    return summary
