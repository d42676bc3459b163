"""Manifests: the contract between data and training.

One row per video. Required columns: ``video_uri``, ``patient_id``, ``study_id``, ``split``
(``train``, ``val``, ``test`` or ``unlabeled``) and ``label`` (1 = severe aortic stenosis,
0 = not severe, empty = unknown). Optional: ``n_frames``, ``fps`` and anything else, which is
kept and ignored. CSV or Parquet, local or ``s3://``; a relative ``video_uri`` resolves
against the manifest's own folder, and every ``video_uri`` must resolve inside the job's data
roots (``echo.data.roots``: by default the manifest's folder or bucket).

Errors name the row (1-based, header excluded), the column and the kind of problem, never a
patient identifier or the text of a rejected cell (a column in the wrong place may hold one).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from echo.data import storage
from echo.data.roots import DEFAULT_MAX_OBJECT_MB, normalise_roots, outside_reason
from echo.data.video import MAX_KEYFRAME_INTERVAL_OK, VideoDecodeError, probe, random_access_differs

__all__ = [
    "REQUIRED_COLUMNS",
    "SPLITS",
    "LABELLED_SPLITS",
    "ManifestError",
    "Manifest",
    "Problem",
    "load_manifest",
    "inspect_manifest_objects",
    "combine_manifests",
    "read_table",
    "absolute_uri",
    "validate",
    "summary",
    "format_summary",
    "label_fraction_patients",
    "describe_cell",
]

REQUIRED_COLUMNS = ("video_uri", "patient_id", "study_id", "split", "label")
SPLITS = ("train", "val", "test", "unlabeled")
LABELLED_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Problem:
    """One finding. ``row`` is 1-based, header excluded; ``None`` for whole-file findings."""

    message: str
    row: int | None = None
    column: str | None = None

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return (", ".join(where) + ": " if where else "") + self.message


class ManifestError(ValueError):
    """A manifest that must not be used. ``problems`` lists every finding."""

    def __init__(self, uri: str, problems: Sequence[Problem]):
        self.uri = uri
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"manifest {uri} is invalid ({len(self.problems)} problem(s)):\n{shown}{more}")

    def __reduce__(self):  # picklable across Ray and loader processes
        return (type(self), (self.uri, self.problems))


@dataclass
class Manifest:
    """A validated manifest.

    ``table`` holds every original column, ``video_uri`` resolved to a full URI, ``label`` as
    a nullable float (NaN = unknown) and ``row`` (1-based, header excluded).
    """

    uri: str
    table: pd.DataFrame
    sha256: str
    warnings: list[Problem] = field(default_factory=list)
    data_roots: list[str] = field(default_factory=list)  # normalised (echo.data.roots)
    max_object_bytes: int = DEFAULT_MAX_OBJECT_MB * 2**20  # larger videos are skipped, never read whole

    def split(self, *names: str) -> pd.DataFrame:
        """Rows whose split is one of ``names``, in file order."""
        return self.table[self.table["split"].isin(names)].reset_index(drop=True)


def absolute_uri(uri: str) -> str:
    """``uri`` made usable from any working directory (Ray workers run elsewhere)."""
    return uri if storage.is_s3(uri) or "://" in uri else os.path.abspath(uri)


def _folder(uri: str) -> str:
    """The folder a manifest's relative ``video_uri`` values resolve against."""
    if storage.is_s3(uri):
        return uri.rsplit("/", 1)[0]
    return os.path.dirname(uri) or "."


def _resolve(folder: str, video_uri: str) -> str:
    return storage.join(folder, video_uri.strip())


def read_table(uri: str) -> tuple[pd.DataFrame, bytes]:
    """The raw table (every cell as a string, empty cells as ``""``) and the file's bytes."""
    data = storage.read_bytes(uri)
    if uri.lower().endswith((".parquet", ".pq")):
        table = pd.read_parquet(io.BytesIO(data))
        table = table.astype(object).where(table.notna(), "").astype(str)
    else:
        try:
            table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            table = pd.DataFrame()
    return table, data


def describe_cell(cell: str, allowed: Sequence[str] = ()) -> str:
    """What kind of value a rejected cell holds, for an error message that must not show it (a
    cell in the wrong column may hold a patient identifier): ``an empty cell``, ``a number``,
    ``'Train' (differs from 'train' in case)`` for a near-miss of an ``allowed`` word
    (shown, being only that word), else ``text``."""
    text = str(cell).strip()
    if text == "":
        return "an empty cell"
    for word in allowed:
        if text.lower() == word:
            return f"{text!r} (differs from {word!r} in case)"
    try:
        float(text)
    except ValueError:
        return "text (not shown: it may be an identifier)"
    return "a number (not shown: it may be an identifier)"


def _parse_label(cell: str) -> float | None:
    """``"1"``/``"1.0"`` -> 1.0, ``"0"`` -> 0.0, ``""`` -> NaN, anything else -> ``None``."""
    text = cell.strip()
    if text == "":
        return math.nan
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value in (0.0, 1.0) else None


def validate(table: pd.DataFrame, uri: str, data_roots: Sequence[str] = ()) -> tuple[list[Problem], list[Problem]]:
    """Check a raw table; return ``(errors, warnings)``. See the module docstring for the rules;
    ``data_roots`` as ``echo.data.roots.normalise_roots`` gives them (default: the manifest's)."""
    errors: list[Problem] = []
    warnings: list[Problem] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        problems = [Problem(f"missing required column {c!r}", column=c) for c in missing]
        if len(missing) == len(REQUIRED_COLUMNS):
            problems.append(Problem(f"no header row: the first row must name the columns ({', '.join(REQUIRED_COLUMNS)})"))
        return problems, warnings
    if len(table) == 0:
        return [Problem("the manifest has no rows")], warnings

    rows = np.arange(1, len(table) + 1)
    for col in ("video_uri", "patient_id", "study_id"):
        for r in rows[(table[col].str.strip() == "").to_numpy()]:
            errors.append(Problem("empty value", row=int(r), column=col))

    split = table["split"].str.strip()
    for r, value in zip(rows[~split.isin(SPLITS).to_numpy()], split[~split.isin(SPLITS)]):
        errors.append(Problem(f"unknown split: {describe_cell(value, SPLITS)} (expected one of {', '.join(SPLITS)})",
                              int(r), "split"))

    labels = [_parse_label(c) for c in table["label"]]
    for r, lab, cell, sp in zip(rows, labels, table["label"], split):
        if lab is None:
            errors.append(Problem(f"label is not 1, 0 or empty: {describe_cell(cell)}", int(r), "label"))
        elif math.isnan(lab) and sp in LABELLED_SPLITS:
            errors.append(Problem(f"split {sp!r} needs a label (1 or 0)", int(r), "label"))

    # Compared after resolution: "videos/a.mp4" and the same file's absolute path are one video.
    folder = _folder(uri)
    roots = list(data_roots) or normalise_roots((), uri)
    first_row: dict[str, int] = {}
    for r, cell, v in zip(rows, table["video_uri"], (_resolve(folder, v) for v in table["video_uri"])):
        if cell.strip() and (reason := outside_reason(v, roots)):
            errors.append(Problem(reason, int(r), "video_uri"))
        if v in first_row:
            errors.append(Problem(f"duplicate video_uri (first on row {first_row[v]})", int(r), "video_uri"))
        else:
            first_row[v] = int(r)

    # Leakage: a patient in more than one of train/val/test. Messages never show the ID.
    seen: dict[str, tuple[str, int]] = {}
    labelled_patients: dict[str, str] = {}
    for r, pid, sp in zip(rows, table["patient_id"], split):
        if sp in LABELLED_SPLITS:
            if pid in seen and seen[pid][0] != sp:
                errors.append(
                    Problem(
                        f"patient is in split {sp!r} here and in {seen[pid][0]!r} on row {seen[pid][1]} "
                        "(patient-level leakage)",
                        int(r),
                        "patient_id",
                    )
                )
            seen.setdefault(pid, (sp, int(r)))
            labelled_patients.setdefault(pid, sp)
    for r, pid, sp in zip(rows, table["patient_id"], split):
        if sp == "unlabeled" and labelled_patients.get(pid) in ("val", "test"):
            warnings.append(
                Problem(
                    f"unlabeled video of a patient in {labelled_patients[pid]!r}: pretraining would see "
                    "evaluation patients",
                    int(r),
                    "patient_id",
                )
            )

    study_label: dict[str, tuple[float, int]] = {}
    for r, sid, lab in zip(rows, table["study_id"], labels):
        if lab is None or math.isnan(lab):
            continue
        if sid in study_label and study_label[sid][0] != lab:
            errors.append(
                Problem(f"study has label {int(lab)} here and {int(study_label[sid][0])} on row {study_label[sid][1]}", int(r), "label")
            )
        study_label.setdefault(sid, (lab, int(r)))

    for col in ("n_frames", "fps"):
        if col in table.columns:
            values = pd.to_numeric(table[col].replace("", np.nan), errors="coerce")
            bad = values.isna() & (table[col].str.strip() != "") | (values <= 0)
            for r in rows[bad.to_numpy()]:
                errors.append(Problem(f"{col} must be a positive number", int(r), col))
    return errors, warnings


def load_manifest(uri: str, check_objects: bool = False, data_roots: Sequence[str] = (),
                  max_object_mb: float = DEFAULT_MAX_OBJECT_MB) -> Manifest:
    """Read and validate the manifest at ``uri``; raise ``ManifestError`` listing every problem.

    ``data_roots``: folders or ``s3://bucket/prefix`` every ``video_uri`` must resolve into
    (default: the manifest's folder, or its bucket). With ``check_objects``, every video is
    probed in storage (see :func:`inspect_manifest_objects`); missing or unreadable videos,
    videos over ``max_object_mb`` MiB and long GOPs become warnings.
    """
    try:
        table, data = read_table(uri)
    except FileNotFoundError as e:
        raise ManifestError(uri, [Problem(str(e))]) from None
    except pd.errors.ParserError as e:  # pandas names lines and field counts, never cell text
        raise ManifestError(uri, [Problem(f"cannot parse: {e}".strip())]) from None
    except (ValueError, OSError) as e:  # other messages may quote the bytes they choked on
        raise ManifestError(uri, [Problem(f"cannot parse ({type(e).__name__})")]) from None
    roots = normalise_roots(data_roots, uri)
    errors, warnings = validate(table, uri, roots)
    if errors:
        raise ManifestError(uri, errors)
    folder = _folder(uri)
    table = table.copy()
    table.insert(0, "row", np.arange(1, len(table) + 1))
    table["split"] = table["split"].str.strip()
    table["video_uri"] = [_resolve(folder, v) for v in table["video_uri"]]
    table["label"] = [_parse_label(c) for c in table["label"]]
    for col in ("n_frames", "fps"):
        if col in table.columns:
            table[col] = pd.to_numeric(table[col].replace("", np.nan), errors="coerce")
    manifest = Manifest(uri=uri, table=table, sha256=hashlib.sha256(data).hexdigest(), warnings=warnings,
                        data_roots=roots, max_object_bytes=int(max_object_mb * 2**20))
    if check_objects:
        manifest.warnings.extend(inspect_manifest_objects(manifest))
    return manifest


def inspect_manifest_objects(manifest: Manifest) -> list[Problem]:
    """Warnings for a manifest's videos: missing, unreadable, larger than the manifest's
    ``max_object_bytes`` (not read), frame count unlike the manifest's, long GOP, or an edit
    list; each names its row."""
    problems = []
    has_n = "n_frames" in manifest.table.columns
    for rec in manifest.table.itertuples(index=False):
        uri = rec.video_uri
        try:
            data = storage.read_bytes(uri, max_bytes=manifest.max_object_bytes)
            info = probe(data, uri)
        except FileNotFoundError:
            problems.append(Problem(f"video not found: {uri}", rec.row, "video_uri"))
            continue
        except (VideoDecodeError, OSError) as e:
            problems.append(Problem(str(e), rec.row, "video_uri"))
            continue
        if has_n and not np.isnan(rec.n_frames) and int(rec.n_frames) != info.n_frames:
            problems.append(
                Problem(f"{uri} has {info.n_frames} frames, the manifest says {int(rec.n_frames)}", rec.row, "n_frames")
            )
        if info.keyframe_interval > MAX_KEYFRAME_INTERVAL_OK:
            problems.append(
                Problem(
                    f"{uri} has keyframes {info.keyframe_interval} frames apart (slow seeking); convert it with "
                    "`echo-ssl ingest` (short-GOP H.264, no edit lists)",
                    rec.row,
                    "video_uri",
                )
            )
        if info.has_edit_list:  # it matters only when it changes the frames decord returns
            try:
                wrong = random_access_differs(data, uri)
            except VideoDecodeError as e:
                wrong = str(e)
            if wrong:
                problems.append(Problem(f"{uri} has an MP4 edit list and {wrong}; convert it with `echo-ssl ingest`",
                                        rec.row, "video_uri"))
    return problems


def combine_manifests(uris: Sequence[str], out_uri: str, data_roots: Sequence[str] = ()) -> pd.DataFrame:
    """One table of every row of the manifests at ``uris`` (each validated first), to be written
    at ``out_uri``: ``video_uri`` relative to ``out_uri``'s folder for a video below it, else
    absolute; columns are the union (missing cells empty). The union is validated as one
    manifest (``data_roots``: where its videos may lie, default its folder), so a video in two of
    them, or a patient in train of one and test of another, is refused (``ManifestError`` naming
    rows of the combined table)."""
    parts = []
    base = _folder(absolute_uri(out_uri)).rstrip("/") + "/"
    for uri in uris:
        load_manifest(uri)
        table, _ = read_table(uri)
        folder = _folder(absolute_uri(uri))
        resolved = [_resolve(folder, v) for v in table["video_uri"]]
        table["video_uri"] = [v[len(base):] if v.startswith(base) else v for v in resolved]
        parts.append(table)
    combined = pd.concat(parts, ignore_index=True).fillna("")
    errors, _ = validate(combined, out_uri, normalise_roots(data_roots, out_uri))
    if errors:
        raise ManifestError(out_uri, errors)
    return combined


def summary(manifest: Manifest) -> pd.DataFrame:
    """Patients, studies, videos and positives (studies and videos) per split, plus a total row."""
    t = manifest.table
    rows = []
    for name in [*SPLITS, "total"]:
        part = t if name == "total" else t[t["split"] == name]
        if name != "total" and len(part) == 0:
            continue
        studies = part.groupby("study_id")["label"].max()
        rows.append(
            {
                "split": name,
                "patients": part["patient_id"].nunique(),
                "studies": len(studies),
                "videos": len(part),
                "positive_studies": int((studies == 1).sum()),
                "positive_videos": int((part["label"] == 1).sum()),
            }
        )
    return pd.DataFrame(rows)


def format_summary(manifest: Manifest) -> str:
    lines = [f"manifest {manifest.uri} (sha256 {manifest.sha256[:12]}): OK"]
    lines.append(summary(manifest).to_string(index=False))
    for w in manifest.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def label_fraction_patients(train: pd.DataFrame, fraction: float, seed: int) -> list[str]:
    """Patients of a label-fraction subset of ``train`` (rows of the train split).

    Patients are sampled within each label stratum (a patient is positive when any of its
    studies is), ``ceil(fraction * n)`` per stratum and at least one where the stratum is
    non-empty. One seeded permutation per stratum is cut at different lengths, so for a
    seed the subsets are nested: the 1% subset lies inside the 5% subset, and so on.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    patient_label = train.groupby("patient_id")["label"].max().sort_index()
    chosen: list[str] = []
    for stratum in (0.0, 1.0):
        patients = patient_label.index[patient_label == stratum].to_numpy()
        if len(patients) == 0:
            continue
        rng = np.random.default_rng([seed, int(stratum)])
        order = patients[rng.permutation(len(patients))]
        k = min(len(order), max(1, math.ceil(fraction * len(order))))
        chosen.extend(order[:k].tolist())
    return sorted(chosen)
