"""Manifests: every validation rule through ``echo-ssl manifest check`` (row and column named,
no patient identifier shown), summaries, CSV and Parquet, local and S3 (moto server), relative
video URIs, ``--check-objects`` warnings, label-fraction subsets and salted ID hashes."""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from echo.data import storage
from echo.cli import main
from echo.data.manifest import (
    ManifestError,
    absolute_uri,
    label_fraction_patients,
    load_manifest,
)
from echo.data.video import encode_mp4

COLUMNS = ["video_uri", "patient_id", "study_id", "split", "label", "n_frames", "fps", "site"]

# Distinctive identifiers, so a leak into any output can be searched for.
GOOD_ROWS: list[dict[str, str]] = [
    # row 1..4: train, 3 patients, one positive study with two videos
    {"video_uri": "videos/v01.mp4", "patient_id": "PID-ALPHA-7731", "study_id": "SID-ALPHA-1", "split": "train", "label": "1"},
    {"video_uri": "videos/v02.mp4", "patient_id": "PID-ALPHA-7731", "study_id": "SID-ALPHA-1", "split": "train", "label": "1.0"},
    {"video_uri": "videos/v03.mp4", "patient_id": "PID-BRAVO-4410", "study_id": "SID-BRAVO-1", "split": "train", "label": "0"},
    {"video_uri": "videos/v04.mp4", "patient_id": "PID-CHARLIE-0912", "study_id": "SID-CHARLIE-1", "split": "train", "label": "0"},
    # row 5..6: val, one positive, one negative
    {"video_uri": "videos/v05.mp4", "patient_id": "PID-DELTA-5520", "study_id": "SID-DELTA-1", "split": "val", "label": "1"},
    {"video_uri": "videos/v06.mp4", "patient_id": "PID-ECHO-3381", "study_id": "SID-ECHO-1", "split": "val", "label": "0"},
    # row 7..8: test, one negative patient with two videos
    {"video_uri": "videos/v07.mp4", "patient_id": "PID-FOXTROT-2264", "study_id": "SID-FOXTROT-1", "split": "test", "label": "0"},
    {"video_uri": "videos/v08.mp4", "patient_id": "PID-FOXTROT-2264", "study_id": "SID-FOXTROT-1", "split": "test", "label": "0"},
    # row 9..10: unlabeled; one is a train patient's extra study, which is allowed
    {"video_uri": "videos/v09.mp4", "patient_id": "PID-GOLF-8813", "study_id": "SID-GOLF-1", "split": "unlabeled", "label": ""},
    {"video_uri": "videos/v10.mp4", "patient_id": "PID-ALPHA-7731", "study_id": "SID-ALPHA-2", "split": "unlabeled", "label": ""},
]
for _r in GOOD_ROWS:
    _r.update(n_frames="60", fps="30", site="north")

SECRETS = sorted({r["patient_id"] for r in GOOD_ROWS} | {r["study_id"] for r in GOOD_ROWS})

# split -> (patients, studies, videos, positive_studies, positive_videos)
GOOD_SUMMARY = {
    "train": (3, 3, 4, 1, 2),
    "val": (2, 2, 2, 1, 1),
    "test": (1, 1, 2, 0, 0),
    "unlabeled": (2, 2, 2, 0, 0),
    "total": (7, 8, 10, 2, 3),
}


def rows_copy() -> list[dict[str, str]]:
    return [dict(r) for r in GOOD_ROWS]


def manifest_bytes(rows: list[dict[str, str]], fmt: str, columns: list[str] | None = None) -> bytes:
    """CSV with every cell as written, or Parquet with native dtypes (float label with NaN, int n_frames)."""
    table = pd.DataFrame(rows, columns=columns or COLUMNS)
    if fmt == "csv":
        return table.to_csv(index=False).encode()
    if "label" in table.columns:
        cells = table["label"]
        if cells.str.fullmatch(r"(-?\d+(\.\d+)?)?").all():
            table["label"] = pd.to_numeric(cells.replace("", np.nan))  # float, NaN = unknown
        else:
            table["label"] = cells.replace("", None)  # strings, null = unknown
    for col in ("n_frames", "fps"):
        if col in table.columns:
            table[col] = pd.to_numeric(table[col], errors="coerce")
    return table.to_parquet(index=False)


def put_manifest(where: str, rows: list[dict[str, str]], fmt: str, columns: list[str] | None = None) -> str:
    """Write the manifest under ``where`` (folder or s3:// prefix); returns its URI."""
    uri = storage.join(where, f"ds/manifest.{fmt}")
    storage.write_bytes(uri, manifest_bytes(rows, fmt, columns))
    return uri


def parse_summary(out: str) -> dict[str, tuple[int, ...]]:
    """The per-split lines of ``format_summary``'s table, as integer tuples."""
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in GOOD_SUMMARY and all(p.isdigit() for p in parts[1:]) and len(parts) == 6:
            found[parts[0]] = tuple(int(p) for p in parts[1:])
    return found


def assert_no_identifiers(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"identifiers leaked into output: {leaked}"


def set_cell(row: int, column: str, value: str) -> Callable[[list[dict[str, str]]], None]:
    def edit(rows: list[dict[str, str]]) -> None:
        rows[row - 1][column] = value

    return edit


# (name, edit of the good rows, row named, column named, words in the message)
BAD_CASES = [
    ("unknown split", set_cell(3, "split", "training"), 3, "split", "unknown split: text"),
    ("split holding a patient ID", set_cell(3, "split", "PID-BRAVO-4410"), 3, "split", "unknown split: text"),
    ("split in capitals", set_cell(3, "split", "Train"), 3, "split", "'Train' (differs from 'train' in case)"),
    ("label holding a study ID", set_cell(4, "label", "SID-CHARLIE-1"), 4, "label", "not 1, 0 or empty: text"),
    ("label 2", set_cell(2, "label", "2"), 2, "label", "is not 1, 0 or empty: a number"),
    ("label yes", set_cell(4, "label", "yes"), 4, "label", "is not 1, 0 or empty"),
    ("label 0.5", set_cell(6, "label", "0.5"), 6, "label", "is not 1, 0 or empty"),
    ("label -1", set_cell(7, "label", "-1"), 7, "label", "is not 1, 0 or empty"),
    ("label nan", set_cell(3, "label", "nan"), 3, "label", "is not 1, 0 or empty"),
    ("labelled split without label", set_cell(5, "label", ""), 5, "label", "needs a label"),
    ("duplicate video_uri", set_cell(6, "video_uri", "videos/v01.mp4"), 6, "video_uri", "duplicate video_uri"),
    # the val patient on row 5 becomes the train patient of rows 1-2: leakage
    ("patient in train and val", set_cell(5, "patient_id", "PID-ALPHA-7731"), 5, "patient_id", "leakage"),
    # the test patient of rows 7-8 also appears in train on row 4
    ("patient in train and test", set_cell(4, "patient_id", "PID-FOXTROT-2264"), 7, "patient_id", "leakage"),
    ("study with conflicting labels", set_cell(2, "label", "0"), 2, "label", "study has label"),
    ("empty patient_id", set_cell(9, "patient_id", ""), 9, "patient_id", "empty value"),
    ("bad n_frames", set_cell(8, "n_frames", "-3"), 8, "n_frames", "positive number"),
]


@pytest.fixture(params=["csv", "parquet"])
def fmt(request) -> str:
    return request.param


def check(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["manifest", "check", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_good_manifest_prints_summary_and_exits_zero(tmp_path: Path, fmt: str, capsys) -> None:
    uri = put_manifest(str(tmp_path), rows_copy(), fmt)
    rc, out, err = check(capsys, uri)
    assert rc == 0, err
    assert "OK" in out and uri in out
    assert parse_summary(out) == GOOD_SUMMARY
    assert "warning" not in out
    assert_no_identifiers(out + err)


@pytest.mark.parametrize("name,edit,row,column,words", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_manifest_names_row_and_column(tmp_path: Path, fmt: str, capsys, name, edit, row, column, words) -> None:
    rows = rows_copy()
    edit(rows)
    uri = put_manifest(str(tmp_path), rows, fmt)
    rc, out, err = check(capsys, uri)
    assert rc != 0
    assert out == ""  # no summary for a manifest that must not be used
    assert f"row {row}, column '{column}'" in err, err
    assert words in err and uri in err
    assert_no_identifiers(out + err)


@pytest.mark.parametrize("column", ["video_uri", "patient_id", "study_id", "split", "label"])
def test_missing_required_column(tmp_path: Path, fmt: str, capsys, column: str) -> None:
    uri = put_manifest(str(tmp_path), rows_copy(), fmt, [c for c in COLUMNS if c != column])
    rc, out, err = check(capsys, uri)
    assert rc != 0 and out == ""
    assert f"column '{column}': missing required column" in err
    assert_no_identifiers(err)


def test_headerless_manifest_is_refused_without_showing_its_first_row(tmp_path: Path, capsys) -> None:
    uri = str(tmp_path / "manifest.csv")
    Path(uri).write_text("".join(",".join(r[c] for c in COLUMNS) + "\n" for r in GOOD_ROWS))
    rc, out, err = check(capsys, uri)
    assert rc != 0 and out == ""
    assert "no header row" in err and "column 'video_uri': missing required column" in err
    assert_no_identifiers(err)


def test_swapped_columns_stop_a_job_without_showing_the_ids(tmp_path: Path) -> None:
    """Issue 17, item 5: a manifest whose ``split`` and ``patient_id`` columns are swapped stops
    ``echo-ssl pretrain`` naming the row, the column and the kind of problem; no ID reaches its
    stdout, stderr or MLflow (the job stops before it creates a run)."""
    rows = rows_copy()
    for r in rows:
        r["patient_id"], r["split"] = r["split"], r["patient_id"]
    uri = put_manifest(str(tmp_path / "data"), rows, "csv")
    db = tmp_path / "mlflow.db"
    proc = subprocess.run(
        [sys.executable, "-m", "echo.cli", "pretrain", "--manifest", uri, "--backbone", "tiny3d",
         "--tracking-uri", f"sqlite:///{db}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "row 1, column 'split': unknown split: text" in proc.stderr, proc.stderr[-2000:]
    assert_no_identifiers(proc.stdout + proc.stderr)
    assert not db.exists() and not (tmp_path / "mlruns").exists()
    written = [f for f in tmp_path.rglob("*") if f.is_file() and f.name != "manifest.csv"]
    assert [f for f in written if any(i.encode() in f.read_bytes() for i in SECRETS)] == []


def test_empty_manifest(tmp_path: Path, fmt: str, capsys) -> None:
    uri = put_manifest(str(tmp_path), [], fmt)  # header only
    rc, out, err = check(capsys, uri)
    assert rc != 0 and out == "" and "no rows" in err
    storage.write_bytes(uri, b"")  # not even a header
    rc, out, err = check(capsys, uri)
    assert rc != 0 and out == "" and uri in err


def test_every_problem_is_listed(tmp_path: Path) -> None:
    rows = rows_copy()
    set_cell(3, "split", "Train")(rows)
    set_cell(6, "label", "")(rows)
    set_cell(8, "video_uri", "videos/v07.mp4")(rows)
    uri = put_manifest(str(tmp_path), rows, "csv")
    with pytest.raises(ManifestError) as info:
        load_manifest(uri)
    found = {(p.row, p.column) for p in info.value.problems}
    assert found == {(3, "split"), (6, "label"), (8, "video_uri")}


def test_duplicates_are_judged_on_resolved_uris(tmp_path: Path, capsys) -> None:
    rows = rows_copy()
    set_cell(4, "video_uri", "./videos/v02.mp4")(rows)
    set_cell(7, "video_uri", str(tmp_path / "ds" / "videos" / "v03.mp4"))(rows)
    uri = put_manifest(str(tmp_path), rows, "csv")
    rc, out, err = check(capsys, uri)
    assert rc != 0
    assert "row 4, column 'video_uri': duplicate video_uri (first on row 2)" in err
    assert "row 7, column 'video_uri': duplicate video_uri (first on row 3)" in err


def test_csv_with_a_byte_order_mark(tmp_path: Path, capsys) -> None:
    uri = str(tmp_path / "excel.csv")
    storage.write_bytes(uri, "\ufeff".encode() + manifest_bytes(rows_copy(), "csv"))
    rc, out, err = check(capsys, uri)
    assert rc == 0, err
    assert parse_summary(out) == GOOD_SUMMARY


def test_missing_manifest_file(tmp_path: Path, capsys) -> None:
    uri = str(tmp_path / "nowhere" / "manifest.csv")
    rc, out, err = check(capsys, uri)
    assert rc != 0 and out == "" and uri in err


def test_unlabeled_video_of_an_evaluation_patient_is_a_warning(tmp_path: Path, capsys) -> None:
    rows = rows_copy()
    set_cell(9, "patient_id", "PID-DELTA-5520")(rows)  # the val patient of row 5
    uri = put_manifest(str(tmp_path), rows, "csv")
    rc, out, err = check(capsys, uri)
    assert rc == 0, err
    assert "warning: row 9, column 'patient_id'" in out and "'val'" in out
    assert_no_identifiers(out + err)


def test_table_contents_and_local_relative_uris(tmp_path: Path, fmt: str, monkeypatch) -> None:
    rows = rows_copy()
    absolute = str(tmp_path / "elsewhere" / "abs.mp4")
    rows[2]["video_uri"] = absolute
    uri = put_manifest(str(tmp_path), rows, fmt)
    t = load_manifest(uri, data_roots=[str(tmp_path)]).table  # the absolute path is outside the manifest's folder
    assert t["row"].tolist() == list(range(1, 11))
    assert t.loc[0, "video_uri"] == str(tmp_path / "ds" / "videos" / "v01.mp4")
    assert t.loc[2, "video_uri"] == absolute
    labels = t["label"].tolist()
    assert labels[:8] == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0] and all(math.isnan(v) for v in labels[8:])
    assert t["n_frames"].tolist() == [60] * 10 and t["site"].tolist() == ["north"] * 10  # extra columns kept
    # a manifest named by a relative path: URIs relative to the working directory, made absolute on request
    monkeypatch.chdir(tmp_path)
    rel = load_manifest(f"ds/manifest.{fmt}", data_roots=["."])
    assert rel.table.loc[0, "video_uri"] == str(Path("ds") / "videos" / "v01.mp4")
    assert absolute_uri(rel.table.loc[0, "video_uri"]) == str(tmp_path / "ds" / "videos" / "v01.mp4")
    assert absolute_uri("s3://b/k.mp4") == "s3://b/k.mp4"
    assert rel.sha256 == hashlib.sha256((tmp_path / "ds" / f"manifest.{fmt}").read_bytes()).hexdigest()


def test_s3_manifest_check_and_relative_uris(s3_bucket: str, fmt: str, capsys) -> None:
    rows = rows_copy()
    rows[3]["video_uri"] = f"s3://{s3_bucket}/other/v04.mp4"
    uri = put_manifest(f"s3://{s3_bucket}/studies", rows, fmt)
    rc, out, err = check(capsys, uri)
    assert rc == 0, err
    assert parse_summary(out) == GOOD_SUMMARY
    t = load_manifest(uri).table
    assert t.loc[0, "video_uri"] == f"s3://{s3_bucket}/studies/ds/videos/v01.mp4"
    assert t.loc[3, "video_uri"] == f"s3://{s3_bucket}/other/v04.mp4"
    # a manifest at the bucket's root
    root = f"s3://{s3_bucket}/manifest.{fmt}"
    storage.write_bytes(root, manifest_bytes(rows, fmt))
    assert load_manifest(root).table.loc[0, "video_uri"] == f"s3://{s3_bucket}/videos/v01.mp4"
    # and a bad one on S3 is refused the same way
    set_cell(5, "patient_id", "PID-ALPHA-7731")(rows)
    storage.write_bytes(uri, manifest_bytes(rows, fmt))
    rc, out, err = check(capsys, uri)
    assert rc != 0 and "row 5, column 'patient_id'" in err
    assert_no_identifiers(out + err)


# --check-objects: real H.264 videos in storage


def _frames(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(n, 16, 16), dtype=np.uint8)


@pytest.fixture(scope="module")
def videos() -> dict[str, bytes]:
    return {
        "good": encode_mp4(_frames(24, 0), fps=30),
        "long_gop": encode_mp4(_frames(60, 1), fps=30, keyframe_interval=48),
    }


@pytest.mark.parametrize("where", ["local", "s3"])
def test_check_objects_warns_for_missing_and_long_gop_videos(
    tmp_path: Path, videos: dict[str, bytes], where: str, request, capsys
) -> None:
    root = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}"
    base = storage.join(root, "ds")
    rows = [
        {"video_uri": "videos/good.mp4", "patient_id": "PID-ALPHA-7731", "study_id": "SID-ALPHA-1", "split": "train", "label": "1", "n_frames": "24"},
        {"video_uri": "videos/missing.mp4", "patient_id": "PID-BRAVO-4410", "study_id": "SID-BRAVO-1", "split": "train", "label": "0", "n_frames": "24"},
        {"video_uri": "videos/slow.mp4", "patient_id": "PID-CHARLIE-0912", "study_id": "SID-CHARLIE-1", "split": "val", "label": "0", "n_frames": "60"},
    ]
    storage.write_bytes(storage.join(base, "videos/good.mp4"), videos["good"])
    storage.write_bytes(storage.join(base, "videos/slow.mp4"), videos["long_gop"])
    uri = put_manifest(root, rows, "csv", ["video_uri", "patient_id", "study_id", "split", "label", "n_frames"])

    rc, out, err = check(capsys, uri)  # without the flag storage is not touched
    assert rc == 0 and "warning" not in out

    rc, out, err = check(capsys, uri, "--check-objects")
    assert rc == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, out
    assert warnings[0].startswith("warning: row 2, column 'video_uri': video not found")
    assert storage.join(base, "videos/missing.mp4") in warnings[0]
    assert warnings[1].startswith("warning: row 3, column 'video_uri'")
    assert re.search(r"keyframes 48 frames apart", warnings[1])
    assert_no_identifiers(out + err)


# Label-fraction subsets


def train_table(n_patients: int = 200, positive_share: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """Rows of a train split: 1-3 videos per patient, one study, label per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = 1.0 if p < round(positive_share * n_patients) else 0.0
        for v in range(int(rng.integers(1, 4))):
            rows.append({"patient_id": f"P{p:04d}", "study_id": f"S{p:04d}", "video_uri": f"v{p}_{v}.mp4", "label": label})
    return pd.DataFrame(rows)


FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


def patient_labels(train: pd.DataFrame) -> pd.Series:
    return train.groupby("patient_id")["label"].max()


def test_label_fractions_are_by_patient_stratified_and_sized() -> None:
    train = train_table()
    labels = patient_labels(train)
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    for f in FRACTIONS:
        chosen = label_fraction_patients(train, f, seed=3)
        assert len(chosen) == len(set(chosen)) and set(chosen) <= set(labels.index)
        got = labels[chosen]
        assert (got == 1).sum() == math.ceil(f * n_pos) and (got == 0).sum() == math.ceil(f * n_neg)
        # the subset's rows are all videos of the chosen patients, and only theirs
        rows = train[train["patient_id"].isin(chosen)]
        assert len(rows) == train["patient_id"].isin(chosen).sum()
        assert rows.groupby("patient_id").size().equals(train.groupby("patient_id").size()[sorted(chosen)])
    assert sorted(label_fraction_patients(train, 1.0, seed=3)) == sorted(labels.index)


def test_label_fractions_keep_both_classes_even_at_one_percent() -> None:
    train = train_table(n_patients=60, positive_share=0.05)  # 3 positives, 57 negatives
    for seed in range(10):
        got = patient_labels(train)[label_fraction_patients(train, 0.01, seed)]
        assert set(got) == {0.0, 1.0} and len(got) == 2
    negatives_only = train[train["label"] == 0]
    got = patient_labels(negatives_only)[label_fraction_patients(negatives_only, 0.01, 0)]
    assert set(got) == {0.0} and len(got) == 1


def test_a_patient_with_any_positive_study_is_a_positive() -> None:
    train = train_table(n_patients=40, positive_share=0.0)
    extra = pd.DataFrame([{"patient_id": "P0007", "study_id": "S-extra", "video_uri": "x.mp4", "label": 1.0}])
    train = pd.concat([train, extra], ignore_index=True)
    assert label_fraction_patients(train, 0.01, seed=0).count("P0007") == 1  # the only positive is always kept


def test_label_fractions_are_seeded_and_independent_of_row_order() -> None:
    train = train_table()
    a = label_fraction_patients(train, 0.25, seed=11)
    assert a == label_fraction_patients(train, 0.25, seed=11)
    shuffled = train.sample(frac=1.0, random_state=5).reset_index(drop=True)
    assert a == label_fraction_patients(shuffled, 0.25, seed=11)
    others = {tuple(label_fraction_patients(train, 0.25, seed=s)) for s in range(12, 16)}
    assert tuple(a) not in others and len(others) == 4


def test_label_fractions_are_nested_for_a_seed() -> None:
    train = train_table()
    for seed in range(5):
        subsets = [set(label_fraction_patients(train, f, seed)) for f in FRACTIONS]
        for small, big in zip(subsets, subsets[1:]):
            assert small < big
        assert subsets[-1] == set(train["patient_id"])


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_bad_label_fraction_raises(fraction: float) -> None:
    with pytest.raises(ValueError, match="label fraction"):
        label_fraction_patients(train_table(20), fraction, seed=0)


# Data roots (issue 17, item 4): a manifest cannot make a job read outside its data


@pytest.mark.parametrize("video_uri", ["/etc/passwd", "../x.mp4", "/proc/self/environ", "/dev/zero"])
def test_a_video_uri_outside_the_data_roots_is_refused(tmp_path: Path, video_uri: str, capsys) -> None:
    rows = rows_copy()
    set_cell(3, "video_uri", video_uri)(rows)
    uri = put_manifest(str(tmp_path), rows, "csv")
    rc, out, err = check(capsys, uri, "--check-objects")
    assert rc != 0
    assert f"row 3, column 'video_uri': resolves outside the data roots ({tmp_path / 'ds'};" in err
    assert video_uri not in out + err and "root:" not in out + err  # neither the cell nor what it names


def test_other_data_roots_are_named_with_data_root(tmp_path: Path, capsys) -> None:
    # manifests and videos side by side: ../videos is outside the manifest's folder
    rows = rows_copy()
    for r in rows:
        r["video_uri"] = "../" + r["video_uri"]
    uri = put_manifest(str(tmp_path), rows, "csv")
    rc, _, err = check(capsys, uri)
    assert rc != 0 and err.count("resolves outside the data roots") == len(rows)
    rc, out, err = check(capsys, uri, "--data-root", str(tmp_path / "videos"), "--data-root", str(tmp_path / "more"))
    assert rc == 0, err
    assert parse_summary(out) == GOOD_SUMMARY


def test_symlinks_leaving_the_root_and_files_that_are_not_regular_are_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "ds" / "videos").mkdir(parents=True)
    (tmp_path / "ds" / "videos" / "v01.mp4").symlink_to("/etc/passwd")
    os.mkfifo(tmp_path / "ds" / "videos" / "v02.mp4")
    (tmp_path / "ds" / "videos" / "v03.mp4").mkdir()
    (tmp_path / "ds" / "videos" / "v04.mp4").symlink_to(tmp_path / "ds" / "videos" / "real.mp4")  # inside: fine
    (tmp_path / "ds" / "videos" / "real.mp4").write_bytes(b"x")
    uri = put_manifest(str(tmp_path), rows_copy(), "csv")
    rc, _, err = check(capsys, uri)
    assert rc != 0
    assert "row 1, column 'video_uri': resolves outside the data roots" in err
    assert "row 2, column 'video_uri': not a regular file" in err
    assert "row 3, column 'video_uri': not a regular file" in err
    assert "row 4," not in err


def test_s3_videos_stay_in_the_manifest_s_bucket_unless_named(s3_bucket: str, capsys) -> None:
    rows = rows_copy()
    set_cell(2, "video_uri", "s3://another-bucket/v02.mp4")(rows)
    set_cell(4, "video_uri", "videos/../../../v04.mp4")(rows)
    uri = put_manifest(f"s3://{s3_bucket}/studies", rows, "csv")
    rc, _, err = check(capsys, uri)
    assert rc != 0
    assert f"row 2, column 'video_uri': resolves outside the data roots (s3://{s3_bucket};" in err
    assert "row 4, column 'video_uri': the key holds '.' or '..' segments" in err
    set_cell(4, "video_uri", "videos/v04.mp4")(rows)
    storage.write_bytes(uri, manifest_bytes(rows, "csv"))
    rc, _, err = check(capsys, uri, "--data-root", f"s3://{s3_bucket}/studies/ds,s3://another-bucket")
    assert rc == 0, err
    rc, _, err = check(capsys, uri, "--data-root", f"s3://{s3_bucket}/studies/elsewhere,s3://another-bucket")
    assert rc != 0 and err.count("resolves outside the data roots") == len(rows) - 1


def test_an_object_over_the_size_cap_is_reported_not_read(tmp_path: Path, capsys) -> None:
    uri = put_manifest(str(tmp_path), rows_copy()[:2], "csv")
    (tmp_path / "ds" / "videos").mkdir(parents=True)
    with open(tmp_path / "ds" / "videos" / "v01.mp4", "wb") as f:
        f.truncate(64 * 2**30)  # sparse: 64 GiB that would exhaust memory if read
    (tmp_path / "ds" / "videos" / "v02.mp4").write_bytes(b"\0" * (2**20 + 1))
    rc, out, err = check(capsys, uri, "--check-objects")
    assert rc == 0, err
    assert "warning: row 1, column 'video_uri':" in out and "65536.0 MiB, over the 1024 MiB cap (--max-object-mb)" in out
    assert "warning: row 2, column 'video_uri':" in out and "not a readable video" in out
    rc, out, err = check(capsys, uri, "--check-objects", "--max-object-mb", "1")
    assert "warning: row 2, column 'video_uri':" in out and "1.0 MiB, over the 1 MiB cap" in out
