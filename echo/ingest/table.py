"""Where video files' IDs, splits and labels come from: a table joined to the files.

A layout is a preset of the generic table options:

- ``echonet-dynamic``: ``SRC/FileList.csv``, column ``FileName`` (no extension) naming
  ``SRC/Videos/<FileName>.avi``, column ``Split`` (TRAIN/VAL/TEST); one video per patient.
- ``echonet-lvh``: ``SRC/MeasurementsList.csv``, column ``HashedFileName`` naming
  ``SRC/Batch*/<HashedFileName>.avi``, column ``split``; one row per measurement, so several
  rows per video; one video per patient.
- generic: ``--table CSV`` and the ``--*-column`` options, any of which but the video column may
  be absent.

A table value names a file when it equals the file's path relative to the layout's folders
(or to SRC), with or without the extension, or its base name with or without the extension;
a value naming several files is ambiguous and matches none. Files no row names, rows naming no
file and repeated rows are counted and reported by row number (never by value, which may hold
an identifier). Repeated rows that disagree (patient, study, split or label) drop their video.
"""

from __future__ import annotations

import fnmatch
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field

import pandas as pd

from echo.data import storage
from echo.data.manifest import LABELLED_SPLITS, _parse_label, describe_cell

__all__ = ["LAYOUTS", "TableSpec", "VideoRow", "Join", "TableError", "table_spec", "join_table", "check_splits"]


class TableError(ValueError):
    """A table that cannot be joined (missing file or column, bad cell); names rows and columns only."""


@dataclass(frozen=True)
class TableSpec:
    """Which table, which columns (None = absent) and under which folders of SRC the videos lie
    (glob patterns of the first path component; empty = anywhere)."""

    uri: str
    video_column: str
    patient_column: str | None = None
    study_column: str | None = None
    split_column: str | None = None
    label_column: str | None = None
    folders: tuple[str, ...] = ()


# Column names as the datasets ship them (see docs/your-own-videos.md for the sources).
LAYOUTS: dict[str, dict] = {
    "echonet-dynamic": {"table": "FileList.csv", "video_column": "FileName", "split_column": "Split", "folders": ("Videos",)},
    "echonet-lvh": {"table": "MeasurementsList.csv", "video_column": "HashedFileName", "split_column": "split",
                    "folders": ("Batch*",)},
}

_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class VideoRow:
    """The table's word on one file: raw identifier cells (hashed by the caller, never logged:
    ``repr`` hides them), the normalised split (None when the table has none), the label (NaN
    = unknown) and the first row (1-based, header excluded) naming the file."""

    patient: str | None = field(repr=False)
    study: str | None = field(repr=False)
    split: str | None
    label: float
    row: int


@dataclass
class Join:
    """Matched files (URI -> row) and what did not match, by row number or file URI."""

    videos: dict[str, VideoRow]
    not_in_table: list[str]
    rows_without_file: list[int]
    ambiguous_rows: list[int]
    repeated_rows: list[int]
    conflicting: dict[str, list[int]]  # URI -> rows that disagree about it (the video is dropped)
    rows: int


def table_spec(src: str, layout: str | None, table: str | None, columns: dict[str, str | None]) -> TableSpec | None:
    """The spec for a layout (its preset, overridden by any column given) or a generic table;
    None when neither is given. ``columns``: ``video_column``, ``patient_column``, ... -> name or None."""
    if layout is None and table is None:
        return None
    preset = {}
    if layout is not None:
        if layout not in LAYOUTS:
            raise TableError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
        preset = LAYOUTS[layout]
    uri = table or storage.join(src, preset["table"])
    chosen = {k: v for k, v in columns.items() if v}
    merged = {k: v for k, v in preset.items() if k.endswith("_column")} | chosen
    if "video_column" not in merged:
        raise TableError("a table needs --video-column (the column naming each video file)")
    return TableSpec(uri=uri, folders=tuple(preset.get("folders", ())), **merged)


def _read(uri: str) -> pd.DataFrame:
    try:
        return pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise TableError(f"table not found: {uri}") from None
    except (ValueError, OSError) as e:
        raise TableError(f"table {uri} cannot be read as CSV ({type(e).__name__})") from None


def _stem(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return path[: len(path) - len(base)] + (base.rsplit(".", 1)[0] if "." in base else base)


def _index(files: list[str], src: str, folders: tuple[str, ...]) -> dict[str, list[str]]:
    """Every name a table value may use for each file under ``src`` (inside ``folders``)."""
    root = src.rstrip("/") + "/"
    names: dict[str, set[str]] = defaultdict(set)
    for uri in files:
        rel = uri[len(root):] if uri.startswith(root) else uri
        first, _, inner = rel.partition("/")
        if folders:
            if not inner or not any(fnmatch.fnmatchcase(first, f) for f in folders):
                continue
            keys = {inner, _stem(inner)}
        else:
            keys = set()
        base = rel.rsplit("/", 1)[-1]
        keys |= {rel, _stem(rel), base, _stem(base)}
        for k in keys:
            names[k].add(uri)
    return {k: sorted(v) for k, v in names.items()}


def _cell(table: pd.DataFrame, column: str | None, i: int) -> str | None:
    if column is None:
        return None
    return table[column].iat[i].strip() or None


def join_table(spec: TableSpec, files: list[str], src: str) -> Join:
    """Join the table to the files listed under ``src``. Raises ``TableError`` for a missing
    column, a split other than train/val/test (any case) or empty, or a label other than 1, 0 or
    empty, naming the row and column, never the cell."""
    table = _read(spec.uri)
    columns = {spec.video_column, spec.patient_column, spec.study_column, spec.split_column, spec.label_column} - {None}
    missing = sorted(c for c in columns if c not in table.columns)
    if missing:
        # The header is not shown: in a file without one, the first row's cells are the column names.
        raise TableError(f"table {spec.uri} lacks column(s) {', '.join(missing)}: its first row must name the columns "
                         f"(it has {len(table.columns)} column(s); names not shown, they may be IDs of a headerless file)")
    index = _index([f for f in files if f != spec.uri], src, spec.folders)
    videos: dict[str, VideoRow] = {}
    rows_of: dict[str, list[int]] = defaultdict(list)
    without_file: list[int] = []
    ambiguous: list[int] = []
    repeated: list[int] = []
    conflicting: dict[str, list[int]] = {}
    for i in range(len(table)):
        row = i + 1
        value = _cell(table, spec.video_column, i)
        split_cell = _cell(table, spec.split_column, i)
        split = _SPLIT_NAMES.get(split_cell.lower()) if split_cell else None
        if split_cell and split is None:
            raise TableError(f"table {spec.uri} row {row}: column {spec.split_column!r} is not train, val or test")
        label_cell = _cell(table, spec.label_column, i) or ""
        label = _parse_label(label_cell)
        if label is None:
            raise TableError(f"table {spec.uri} row {row}: column {spec.label_column!r} is not 1, 0 or empty: "
                             f"{describe_cell(label_cell)}")
        matches = index.get(value, []) if value else []
        if not matches:
            without_file.append(row)
            continue
        if len(matches) > 1:
            ambiguous.append(row)
            continue
        uri = matches[0]
        record = VideoRow(_cell(table, spec.patient_column, i), _cell(table, spec.study_column, i), split, label, row)
        rows_of[uri].append(row)
        if uri not in videos:
            videos[uri] = record
            continue
        repeated.append(row)
        first = videos[uri]
        same_label = first.label == label or (math.isnan(first.label) and math.isnan(label))
        if (first.patient, first.study, first.split) != (record.patient, record.study, record.split) or not same_label:
            conflicting[uri] = rows_of[uri]
    for uri in conflicting:
        videos.pop(uri, None)
    named = set(videos) | set(conflicting)
    in_scope = {u for us in index.values() for u in us}
    not_in_table = sorted(u for u in in_scope if u not in named)
    return Join(videos, not_in_table, without_file, ambiguous, repeated, conflicting, len(table))


def check_splits(videos: dict[str, str], split_of: dict[str, str], rows: dict[str, int], uri: str) -> None:
    """Raise ``TableError`` when one patient (``videos``: file -> patient hash) lands in two of
    train/val/test (``split_of``: file -> split), naming the rows."""
    first: dict[str, tuple[str, int]] = {}
    for f in sorted(videos, key=lambda f: rows[f]):
        split = split_of[f]
        if split not in LABELLED_SPLITS:
            continue
        patient = videos[f]
        if patient in first and first[patient][0] != split:
            raise TableError(
                f"table {uri} row {rows[f]}: the patient is in split {split!r} here and in "
                f"{first[patient][0]!r} on row {first[patient][1]} (patient-level leakage)"
            )
        first.setdefault(patient, (split, rows[f]))
