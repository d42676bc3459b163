"""``echo-ssl ingest`` on video files (issue 19): every codec and container of tests/videofiles.py,
colour and grey, 112x112 and 640x480 with a fake name burned into a corner; the EchoNet-Dynamic and
EchoNet-LVH layouts and a generic table; local folders and the moto S3 server. Checked by decoding
the clips frame by frame against an independent decode of the sources, and by reading the manifest,
the skip report and every object key and cell back."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage
from videofiles import BURNED_TEXT, TEXT_CORNER, b_frames, decode_all, echo_frames, has_edit_list, trim_edit_list, write_video

from echo.commands import ingest as ingest_command
from echo.commands import manifest_check, manifest_combine
from echo.data import storage
from echo.data.manifest import load_manifest
from echo.data.video import decode_frames, probe
from echo.ingest import fan
from echo.ingest.frames import work_shape
from echo.data.ids import ID_KEY_ENV
from echo.ingest.pipeline import IngestError, IngestOptions, ingest, split_for_patient

KEY = "test-key-0123456789-not-a-real-secret"
MRN = "MRN0012345"  # exports name files after patients


def hmac_hex(kind: str, value: str) -> str:
    return hmac.new(KEY.encode(), f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:32]


def clip_name(data: bytes) -> str:
    return f"videos/{hmac_hex('video', hashlib.sha256(data).hexdigest())}.mp4"


@pytest.fixture(autouse=True)
def key(monkeypatch) -> str:
    monkeypatch.setenv(ID_KEY_ENV, KEY)
    return KEY


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="echo-ssl ingest")
    ingest_command.add_arguments(parser)
    return ingest_command.run(parser.parse_args(argv))


def expected_clip(data: bytes, size: tuple[int, int] = (112, 112)) -> tuple[np.ndarray, np.ndarray]:
    """Independent reading of a source: every frame by a sequential FFmpeg decode, reduced to the
    working grid, masked to the estimated sector and cropped: ``(clip, the source's (H, W) mask)``."""
    frames = decode_all(data)
    h, w = work_shape(*frames.shape[1:], size)
    small = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BILINEAR)) for f in frames])
    mask = fan.estimate_sector(small)
    return fan.crop_to_sector(small, mask, size), mask


# (file name, codec and container, frame size, colour): one of each codec; B-frames with an edit
# list in colour at 640x480, and grey at both sizes.
SOURCES = [
    (f"{MRN}_a.avi", "mjpeg.avi", (112, 112), True),
    (f"{MRN}_b.avi", "mpeg4.avi", (480, 640), False),
    (f"{MRN}_c.mp4", "h264-bframes.mp4", (480, 640), True),
    (f"{MRN}_d.mov", "h264.mov", (112, 112), False),
    (f"{MRN}_e.mkv", "h264.mkv", (112, 112), True),
]


@pytest.fixture(scope="module")
def sources() -> dict[str, bytes]:
    return {name: write_video(echo_frames(size, colour), kind) for name, kind, size, colour in SOURCES}


def test_every_codec_is_ingested_grey_masked_frame_exact_and_named_by_hash(tmp_path, sources, caplog, capfd):
    caplog.set_level(logging.INFO)
    bframes = sources[f"{MRN}_c.mp4"]
    assert has_edit_list(bframes) and b_frames(bframes) > 10, "the MP4 source has B-frames and an edit list"
    src = tmp_path / f"export {MRN}"
    src.mkdir()
    for name, data in sources.items():
        (src / name).write_bytes(data)
    (src / "copy.mkv").write_bytes(sources[f"{MRN}_e.mkv"])
    (src / "truncated.mp4").write_bytes(bframes[: len(bframes) // 3])
    (src / f"{MRN}.txt").write_bytes(f"{MRN} ZZTEST^SECRET\n".encode())
    out = tmp_path / "out"
    rc = run_cli([str(src), "--out", str(out), "--workers", "2"])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    assert "8 file(s) seen, 5 clip(s) in the manifest (5 new, 0 already done), 3 skipped" in captured.out
    assert "each is its own patient and study" in captured.out
    skipped = {line.split(":")[0].strip() for line in captured.out.splitlines() if line.startswith("  skipped ")}
    assert skipped == {"skipped corrupt", "skipped duplicate", "skipped not_dicom"}
    assert any(r.getMessage().startswith("progress: 8/8 files") for r in caplog.records)

    table = load_manifest(str(out / "manifest.csv")).table
    assert len(table) == 5 and set(table["split"]) == {"unlabeled"}
    for name, kind, size, colour in SOURCES:
        data = sources[name]
        uri = str(out / clip_name(data))
        row = table[table["video_uri"] == uri].iloc[0]
        own = clip_name(data).split("/")[1][:-4]
        assert row["patient_id"] == hmac_hex("patient", f"video:{own}") and row["study_id"] == hmac_hex("study", f"video:{own}")
        assert (row["n_frames"], row["fps"], int(row["rows"]), int(row["cols"])) == (30, 30.0, size[0], size[1])
        clip_bytes = (out / clip_name(data)).read_bytes()
        info = probe(clip_bytes, uri)
        assert (info.n_frames, info.height, info.width, info.fps) == (30, 112, 112, 30.0), kind
        assert info.keyframe_interval <= 8 and not info.has_edit_list
        clip = decode_frames(clip_bytes, range(30), uri).astype(int)
        expected, mask = expected_clip(data)
        # Every frame, in order: frame i matches source frame i far better than its neighbours (a
        # dropped, repeated or shifted frame, as a mishandled edit list gives, would not).
        distance = np.abs(clip[:, None] - expected[None].astype(int)).mean(axis=(2, 3))
        same, shifted = np.diag(distance), np.minimum(np.diag(distance, 1)[1:], np.diag(distance, -1)[:-1])
        assert same.max() < 4.0 and same.mean() < 0.7 * shifted.mean(), kind
        # The burned-in corner lies outside the sector, and nothing outside it survives.
        h, w = mask.shape
        x0, y0, x1, y1 = (int(f * d) for f, d in zip(TEXT_CORNER, (w, h, w, h)))
        assert not mask[y0 : y1 + 1, x0 : x1 + 1].any(), kind
        # Past 3 pixels from the kept area only H.264 ringing of the clip's own edge remains (a few
        # gray levels; the white text would be 255).
        beyond = ~ndimage.binary_dilation(expected.max(axis=0) > 0, iterations=3)
        assert beyond.sum() > 1000 and clip[:, beyond].max() <= 8, kind

    written = [p.relative_to(out).as_posix() for p in out.rglob("*")]
    texts = [p.read_text() for p in out.rglob("*") if p.suffix in (".csv", ".json")]
    logs = [r.getMessage() for r in caplog.records] + [captured.out, captured.err]
    for text in written + texts + logs:
        assert MRN not in text and BURNED_TEXT not in text and "ZZTEST" not in text

    # A re-run converts nothing and writes the same manifest.
    manifest = (out / "manifest.csv").read_bytes()
    again = ingest(IngestOptions(src=str(src), out=str(out), workers=1))
    assert (again.ingested, again.already_done) == (0, 5)
    assert (out / "manifest.csv").read_bytes() == manifest


def echonet_dynamic(files: dict[str, bytes]) -> dict[str, bytes]:
    """An EchoNet-Dynamic tree (column names as echonet/dynamic's echonet/datasets/echo.py reads
    them): FileList.csv with one row per video and one row whose file is missing; Videos/ with
    one file the table does not list; VolumeTracings.csv."""
    names = list(files)
    rows = ["FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split"]
    splits = ["TRAIN", "VAL", "TEST", "TRAIN"]
    for name, split in zip([*names[:-1], "0XMISSINGVIDEO"], splits):
        rows.append(f"{name},55.1,40.2,90.3,112,112,30,30,{split}")
    tree = {f"Videos/{name}.avi": data for name, data in files.items()}
    tree["FileList.csv"] = ("\n".join(rows) + "\n").encode()
    tree["VolumeTracings.csv"] = b"FileName,X1,Y1,X2,Y2,Frame\n"
    return tree


def test_echonet_dynamic_layout_from_s3(s3_bucket, capfd):
    clip = echo_frames((112, 112), True, n_frames=12, text=False)
    videos = {f"0X{i:016X}": write_video(np.roll(clip, i, axis=2), "mjpeg.avi", fps=50) for i in range(4)}
    for rel, data in echonet_dynamic(videos).items():
        storage.write_bytes(f"s3://{s3_bucket}/echonet/{rel}", data)
    out = f"s3://{s3_bucket}/ingested"
    rc = run_cli([f"s3://{s3_bucket}/echonet", "--layout", "echonet-dynamic", "--out", out, "--workers", "1"])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    assert "table s3://" in captured.out and "FileList.csv: 4 row(s), 3 video file(s) matched" in captured.out
    assert "files not in the table: 1" in captured.out and "rows without a file: 1 (rows 4)" in captured.out
    assert "no patient column: each video is its own patient and study" in captured.out
    table = load_manifest(f"{out}/manifest.csv").table
    # No label column: every video is unlabeled; the data set's own split is kept.
    assert list(table["split"]) == ["unlabeled"] * 3
    assert sorted(table["source_split"]) == ["test", "train", "val"]
    assert (table["fps"] == 50.0).all() and (table["n_frames"] == 12).all()
    assert table["patient_id"].nunique() == 3
    for uri in table["video_uri"]:
        assert probe(storage.read_bytes(uri), uri).n_frames == 12
    keys = storage.list_prefix(out)
    assert not any(name in k for k in keys for name in videos)


def test_echonet_lvh_layout_collapses_measurement_rows_and_reports_conflicts(tmp_path, capfd):
    src = tmp_path / "lvh"
    clip = echo_frames((112, 112), False, n_frames=10, text=False)
    names = ["0XA1", "0XB2", "0XC3"]
    for i, name in enumerate(names):
        folder = src / f"Batch{i % 2 + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.avi").write_bytes(write_video(np.roll(clip, i, axis=2), "mpeg4.avi"))
    rows = ["HashedFileName,Calc,CalcValue,Frame,X1,X2,Y1,Y2,Frames,FPS,Width,Height,split"]
    for name, split in (("0XA1", "train"), ("0XB2", "val"), ("0XC3", "test")):
        for calc in ("IVSd", "LVIDd", "LVPWd"):
            rows.append(f"{name},{calc},1.0,10,1,2,3,4,10,30,112,112,{split}")
    rows.append("0XC3,LVIDs,1.0,10,1,2,3,4,10,30,112,112,train")  # disagrees with the rows above
    (src / "MeasurementsList.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    rc = run_cli([str(src), "--layout", "echonet-lvh", "--out", str(out), "--as-unlabeled", "--workers", "1"])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    assert "10 row(s), 2 video file(s) matched" in captured.out
    assert "rows repeating a video: 7" in captured.out
    assert "rows 7, 8, 9, 10 name one video with different IDs, split or label: video not ingested" in captured.out
    table = load_manifest(str(out / "manifest.csv")).table
    assert len(table) == 2 and set(table["split"]) == {"unlabeled"} and sorted(table["source_split"]) == ["train", "val"]


def test_generic_table_ids_labels_and_seeded_patient_splits(tmp_path, capfd):
    src = tmp_path / "src"
    (src / "clips").mkdir(parents=True)
    clip = echo_frames((112, 112), False, n_frames=8, text=False)
    rows = ["file,mrn,accession,severe_as"]
    for i in range(8):
        (src / "clips" / f"{MRN}_{i}.mp4").write_bytes(write_video(np.roll(clip, i, axis=1), "h264-bframes.mp4"))
        patient = f"{MRN}-{i // 2}"  # two videos per patient, one study each
        label = "" if i >= 6 else str(i // 2 % 2)
        rows.append(f"clips/{MRN}_{i},{patient},ACC-ZZ-{i // 2},{label}")
    (src / "table.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = [str(src), "--table", str(src / "table.csv"), "--video-column", "file", "--patient-column", "mrn",
            "--study-column", "accession", "--label-column", "severe_as", "--out", str(out), "--workers", "2",
            "--splits", "0.5,0.25,0.25", "--split-seed", "7"]
    assert run_cli(argv) == 0
    captured = capfd.readouterr()
    assert MRN not in captured.out + captured.err and "ACC-ZZ" not in captured.out
    table = load_manifest(str(out / "manifest.csv")).table
    assert len(table) == 8 and table["patient_id"].nunique() == 4 and table["study_id"].nunique() == 4
    for p in range(4):
        part = table[table["patient_id"] == hmac_hex("patient", f"{MRN}-{p}")]
        assert len(part) == 2 and set(part["study_id"]) == {hmac_hex("study", f"ACC-ZZ-{p}")}
        if p < 3:
            assert set(part["label"]) == {float(p % 2)}
            assert set(part["split"]) == {split_for_patient(hmac_hex("patient", f"{MRN}-{p}"), (0.5, 0.25, 0.25), 7)}
        else:
            assert part["label"].isna().all() and set(part["split"]) == {"unlabeled"}
    for cell in pd.read_csv(out / "manifest.csv", dtype=str).fillna("").to_numpy().ravel():
        assert MRN not in cell and "ACC-ZZ" not in cell

    # --as-unlabeled: the same clips (nothing re-encoded), every one unlabeled.
    summary = ingest(IngestOptions(src=str(src), out=str(out), table=str(src / "table.csv"), video_column="file",
                                   patient_column="mrn", label_column="severe_as", as_unlabeled=True))
    assert (summary.ingested, summary.already_done, summary.split_counts) == (0, 8, {"unlabeled": 8})

    # A split cell that is not train/val/test, and a patient in two splits: refused before decoding,
    # naming the row and column, never the cell.
    bad = tmp_path / "bad.csv"
    bad.write_text(f"file,mrn,split,severe_as\nclips/{MRN}_0,{MRN}-0,{MRN},1\n")
    with pytest.raises(IngestError, match="row 1: column 'split' is not train, val or test") as info:
        ingest(IngestOptions(src=str(src), out=str(tmp_path / "o2"), table=str(bad), video_column="file",
                             split_column="split", label_column="severe_as"))
    assert MRN not in str(info.value)
    bad.write_text(f"file,mrn,split,severe_as\nclips/{MRN}_0,{MRN}-0,train,1\nclips/{MRN}_1,{MRN}-0,test,1\n")
    with pytest.raises(IngestError, match="row 2: the patient is in split 'test' here and in 'train' on row 1") as info:
        ingest(IngestOptions(src=str(src), out=str(tmp_path / "o2"), table=str(bad), video_column="file",
                             patient_column="mrn", split_column="split", label_column="severe_as"))
    assert MRN not in str(info.value) and not (tmp_path / "o2").exists()


def test_a_video_over_the_pixel_budget_is_refused_from_its_header(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.avi").write_bytes(write_video(echo_frames((480, 640), False, n_frames=10, text=False), "mjpeg.avi"))
    (src / "small.avi").write_bytes(write_video(echo_frames((112, 112), False, n_frames=10, text=False), "mjpeg.avi"))
    summary = ingest(IngestOptions(src=str(src), out=str(tmp_path / "out"), max_pixels=10 * 112 * 112))
    assert summary.rows == 1 and summary.skipped_by_reason == {"over_budget": 1}
    assert "10 frames of 480x640" in summary.skipped[0].detail


def test_manifest_check_warns_about_an_edit_list_only_when_decord_gets_frames_wrong(tmp_path, capsys):
    """Issue 19 item 4: the B-frame MP4's edit list leaves decord's frames right (no edit-list
    warning, only the slow-seeking one); an edit list that trims 5 frames makes decord return
    frames a sequential decode does not present (warned); both point to ``echo-ssl ingest``, and
    their ingested versions draw no warning."""
    src = tmp_path / "src"
    src.mkdir()
    right = write_video(echo_frames((112, 112), False, text=False), "h264-bframes.mp4")
    wrong = trim_edit_list(right, 5)
    assert len(decode_all(wrong)) == 25
    (src / "right.mp4").write_bytes(right)
    (src / "wrong.mp4").write_bytes(wrong)
    rows = ["video_uri,patient_id,study_id,split,label", "right.mp4,p1,s1,unlabeled,", "wrong.mp4,p2,s2,unlabeled,"]
    (src / "manifest.csv").write_text("\n".join(rows) + "\n")

    def check(uri: str) -> list[str]:
        parser = argparse.ArgumentParser()
        manifest_check.add_arguments(parser)
        assert manifest_check.run(parser.parse_args([uri, "--check-objects"])) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]

    warnings = check(str(src / "manifest.csv"))
    assert len(warnings) == 3, warnings
    assert "row 1" in warnings[0] and "keyframes 30 frames apart (slow seeking)" in warnings[0]
    assert "row 2" in warnings[1] and "keyframes" in warnings[1]
    assert "row 2" in warnings[2] and "edit list and decord counts 30 frames, a sequential decode 25" in warnings[2]
    assert all("`echo-ssl ingest`" in w for w in warnings)

    summary = ingest(IngestOptions(src=str(src), out=str(tmp_path / "out")))
    assert summary.rows == 2
    assert check(summary.manifest_uri) == []


def test_manifests_combine_into_one_pretraining_corpus(tmp_path, capsys):
    """Issue 19 item 3: a public set ingested --as-unlabeled and a team's labelled videos, each
    with its own manifest, become one manifest that resolves every video; a video in both is refused."""
    clip = echo_frames((112, 112), False, n_frames=8, text=False)
    public, own = tmp_path / "public", tmp_path / "own"
    for folder, shift in ((public, 0), (own, 10)):
        folder.mkdir()
        for i in range(2):
            (folder / f"v{i}.avi").write_bytes(write_video(np.roll(clip, shift + i, axis=2), "mjpeg.avi"))
    (own / "table.csv").write_text("file,mrn,label\nv0,ZZ-P1,1\nv1,ZZ-P2,0\n")
    ingest(IngestOptions(src=str(public), out=str(tmp_path / "corpora" / "public"), as_unlabeled=True))
    ingest(IngestOptions(src=str(own), out=str(tmp_path / "corpora" / "own"), table=str(own / "table.csv"),
                         video_column="file", patient_column="mrn", label_column="label", splits=(1.0, 0.0, 0.0)))
    a, b = (str(tmp_path / "corpora" / d / "manifest.csv") for d in ("public", "own"))
    combined = str(tmp_path / "corpora" / "pretrain.csv")
    parser = argparse.ArgumentParser()
    manifest_combine.add_arguments(parser)
    assert manifest_combine.run(parser.parse_args([a, b, "--out", combined])) == 0
    table = load_manifest(combined).table
    assert len(table) == 4 and sorted(table["split"]) == ["train", "train", "unlabeled", "unlabeled"]
    assert pd.read_csv(combined)["video_uri"].str.match(r"^(public|own)/videos/[0-9a-f]{32}\.mp4$").all()
    for uri in table["video_uri"]:
        assert probe(storage.read_bytes(uri), uri).n_frames == 8
    capsys.readouterr()
    assert manifest_combine.run(parser.parse_args([a, a, "--out", str(tmp_path / "twice.csv")])) == 1
    assert "duplicate video_uri" in capsys.readouterr().err


def test_a_combined_manifest_outside_its_videos_folders_needs_their_data_roots(tmp_path, capsys):
    clip = echo_frames((112, 112), False, n_frames=8, text=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "v.avi").write_bytes(write_video(clip, "mjpeg.avi"))
    ingest(IngestOptions(src=str(tmp_path / "a"), out=str(tmp_path / "corpus")))
    parser = argparse.ArgumentParser()
    manifest_combine.add_arguments(parser)
    elsewhere = str(tmp_path / "manifests" / "combined.csv")
    (tmp_path / "manifests").mkdir()
    assert manifest_combine.run(parser.parse_args([str(tmp_path / "corpus" / "manifest.csv"), "--out", elsewhere])) == 1
    assert "row 1" in capsys.readouterr().err
    argv = [str(tmp_path / "corpus" / "manifest.csv"), "--out", elsewhere, "--data-root", str(tmp_path / "corpus")]
    assert manifest_combine.run(parser.parse_args(argv)) == 0
