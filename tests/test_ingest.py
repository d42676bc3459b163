"""``echo-ssl ingest`` end to end: DICOM files (a real cine and variants, see dicomfiles.py) from
a local folder or an ``s3://`` prefix into the moto S3 server, checked by decoding the clips,
reading the manifest back, and searching every key, cell, sidecar and log line for the fake
patient data planted in the sources."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.data import get_testdata_file
from scipy import ndimage
from dicomfiles import (
    FAKE_PHI,
    TEXT_BOX,
    luma,
    native_cine,
    phi_strings,
    real_cine,
    real_rgb,
    to_bytes,
    with_overlays,
    with_regions,
)

from echo.data import storage
from echo.ingest import fan
from echo.commands import ingest as ingest_command
from echo.data.ids import ID_KEY_ENV, keyed_hash
from echo.ingest.pipeline import (
    IngestError,
    IngestOptions,
    Outcome,
    _run_pool,
    _Task,
    ingest,
    load_labels,
    split_for_patient,
)
from echo.data.manifest import load_manifest
from echo.data.video import decode_frames, probe

KEY = "test-key-0123456789-not-a-real-secret"
PATIENT_DIR = "ZZTESTPATIENT_SECRETNAME/PID-ZZ-98765"  # exports name folders after patients
REGION_BOX = (42, 15, 297, 207)


def hmac_hex(kind: str, value: str) -> str:
    return hmac.new(KEY.encode(), f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:32]


@pytest.fixture
def key(monkeypatch) -> str:
    monkeypatch.setenv(ID_KEY_ENV, KEY)
    return KEY


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return real_rgb()


def gray(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.round(luma(rgb)), 0, 255).astype(np.uint8)


def write_sources(root: Path, rgb: np.ndarray) -> dict[str, bytes]:
    """A PACS-like export: three cines of one patient (two studies), and files to skip."""
    study2 = {"StudyInstanceUID": "1.2.826.0.1.3680043.99999.1.535353", "AccessionNumber": "ACCZZ6666"}
    regions = with_regions(
        native_cine(gray(rgb), "MONOCHROME2", n=3, **study2), (*REGION_BOX, 1), (20, 214, 300, 232, 4)
    )
    files = {
        f"{PATIENT_DIR}/echo 1.dcm": to_bytes(real_cine(1)),  # JPEG baseline, YBR_FULL_422
        f"{PATIENT_DIR}/IM0002": to_bytes(native_cine(with_overlays(rgb), "RGB", n=2)),
        f"{PATIENT_DIR}/sub/dir/IM0003": to_bytes(regions),
        "other/single.dcm": to_bytes(native_cine(rgb[:1], "RGB", n=4)),
        "other/truncated.dcm": to_bytes(real_cine(5))[:60000],
        "other/notes.txt": b"ZZTESTPATIENT^SECRETNAME PID-ZZ-98765\n",
        "other/CT_small.dcm": Path(get_testdata_file("CT_small.dcm")).read_bytes(),
        "other/copy of echo 1.dcm": to_bytes(real_cine(1)),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def all_objects(bucket: str) -> dict[str, bytes]:
    return {uri: storage.read_bytes(uri) for uri in storage.list_prefix(f"s3://{bucket}/")}


def assert_no_phi(texts: list[str], extra: tuple[str, ...] = ()) -> None:
    for text in texts:
        for secret in [*phi_strings(), *extra]:
            assert secret not in text, f"{secret!r} leaked"


def test_ingest_local_folder_to_s3(tmp_path, s3_bucket, key, rgb, caplog, capfd):
    caplog.set_level(logging.INFO)
    src = tmp_path / "export"
    write_sources(src, rgb)
    out = f"s3://{s3_bucket}/clips"
    summary = ingest(IngestOptions(src=str(src), out=out, workers=2))

    assert (summary.seen, summary.ingested, summary.already_done, summary.rows) == (8, 3, 0, 3)
    assert summary.skipped_by_reason == {
        "corrupt": 1,
        "duplicate": 1,
        "not_dicom": 1,
        "not_ultrasound": 1,
        "single_frame": 1,
    }
    listing = sorted(storage.list_prefix(str(src)))
    for o in summary.skipped:  # each skipped file is named by its position in the listing
        assert o.name.startswith(f"file {o.position}/8 [")
    by_file = {Path(listing[o.position - 1]).name: o.reason for o in summary.skipped}
    assert by_file == {
        "single.dcm": "single_frame",
        "truncated.dcm": "corrupt",
        "notes.txt": "not_dicom",
        "CT_small.dcm": "not_ultrasound",
        "copy of echo 1.dcm": "duplicate",
    }
    report = summary.format()
    assert "5 skipped" in report and "skipped not_ultrasound: 1" in report and "single_frame" in report

    manifest = load_manifest(f"{out}/manifest.csv")  # validates the contract
    table = manifest.table
    assert len(table) == 3 and set(table["split"]) == {"unlabeled"} and table["label"].isna().all()
    assert set(table["patient_id"]) == {hmac_hex("patient", FAKE_PHI["PatientID"])}
    assert set(table["study_id"]) == {
        hmac_hex("study", FAKE_PHI["StudyInstanceUID"]),
        hmac_hex("study", "1.2.826.0.1.3680043.99999.1.535353"),
    }
    uri_of = {n: f"{out}/videos/{hmac_hex('sop', f'1.2.826.0.1.3680043.99999.3.{n}')}.mp4" for n in (1, 2, 3)}
    assert set(table["video_uri"]) == set(uri_of.values())
    assert set(table.columns) - {"row"} == {
        "video_uri", "patient_id", "study_id", "split", "label", "n_frames", "fps", "rows", "cols",
        "manufacturer", "model", "sector", "source_id",
    }
    sector = dict(zip(table["video_uri"], table["sector"]))
    assert [sector[uri_of[n]] for n in (1, 2, 3)] == ["estimated", "estimated", "regions+estimated"]

    clips = {}
    for n, uri in uri_of.items():
        data = storage.read_bytes(uri)
        info = probe(data, uri)
        assert (info.n_frames, info.height, info.width) == (30, 112, 112)
        assert info.fps == pytest.approx(1000 / 33.333, abs=0.01)
        assert info.keyframe_interval <= 8 and not info.has_edit_list
        clips[n] = decode_frames(data, range(30), uri).astype(int)
    assert (table["n_frames"] == 30).all() and np.allclose(table["fps"], 1000 / 33.333, atol=1e-3)

    # Overlay clip: text, ECG and counter lie outside the estimated sector, and every output
    # pixel outside the (resized) sector is black in every frame.
    frames = gray(with_overlays(rgb))
    mask = fan.estimate_sector(frames)
    support = fan.crop_to_sector(np.full((1, *mask.shape), 255, np.uint8), mask, (112, 112))[0] > 0
    far_outside = ~ndimage.binary_dilation(support, iterations=3)
    assert far_outside.sum() > 1500
    assert clips[2][:, far_outside].max() <= 4
    ys, xs = np.nonzero(mask)
    scale = 112 / max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    tx0, ty0 = int((TEXT_BOX[0] - xs.min()) * scale), int((TEXT_BOX[1] - ys.min()) * scale)
    tx1, ty1 = int((TEXT_BOX[2] - xs.min()) * scale), int((TEXT_BOX[3] - ys.min()) * scale)
    top = (112 - round((ys.max() - ys.min() + 1) * scale)) // 2
    left = (112 - round((xs.max() - xs.min() + 1) * scale)) // 2
    text_region = clips[2][:, top + max(ty0, 0) : top + ty1, left + max(tx0, 0) : left + tx1]
    assert text_region.size and text_region.max() <= 4, "burned-in text must be masked"

    # Regions clip: the declared box narrows the estimated sector, never replaces it.
    source = gray(rgb)
    kept = fan.estimate_sector(source) & fan.regions_mask((REGION_BOX,), source.shape[1:])
    expected = fan.crop_to_sector(source, kept, (112, 112)).astype(int)
    assert np.abs(clips[3] - expected).mean() < 3.0
    beyond = ~ndimage.binary_dilation(expected.max(axis=0) > 0, iterations=2)  # past H.264's ringing
    assert beyond.sum() > 1500 and clips[3][:, beyond].max() <= 4, "outside the kept area stays black"

    # No patient data anywhere: object keys, manifest cells, sidecars, log lines, output.
    objects = all_objects(s3_bucket)
    assert_no_phi(list(objects))
    assert_no_phi([v.decode() for k, v in objects.items() if k.endswith((".csv", ".json"))])
    assert_no_phi([str(c) for c in pd.read_csv(io.BytesIO(objects[f"{out}/manifest.csv"]), dtype=str).to_numpy().ravel()])
    captured = capfd.readouterr()
    assert_no_phi([r.getMessage() for r in caplog.records] + [captured.out, captured.err])
    assert any("skipped (not_ultrasound)" in r.getMessage() for r in caplog.records)

    # A re-run converts nothing and writes the same manifest.
    before = {uri: storage.s3_client().head_object(Bucket=s3_bucket, Key=storage.split_s3(uri)[1])["ETag"] for uri in objects}
    again = ingest(IngestOptions(src=str(src), out=out, workers=1))
    assert (again.ingested, again.already_done, again.skipped_by_reason) == (0, 3, summary.skipped_by_reason)
    after = all_objects(s3_bucket)
    assert after == objects
    assert before == {
        uri: storage.s3_client().head_object(Bucket=s3_bucket, Key=storage.split_s3(uri)[1])["ETag"] for uri in after
    }


def run_cli(argv: list[str]) -> int:
    """The ``ingest`` sub-command's own parser and ``run`` (as ``echo-ssl ingest`` calls them)."""
    parser = argparse.ArgumentParser(prog="echo-ssl ingest")
    ingest_command.add_arguments(parser)
    return ingest_command.run(parser.parse_args(argv))


def test_cli_ingests_an_s3_prefix_and_joins_labels(tmp_path, s3_bucket, key, rgb, capfd):
    small = rgb[:10]
    sources = {
        "in/a/1": native_cine(gray(small), "MONOCHROME2", n=11, PatientID="PID-ZZ-1", AccessionNumber="ACCZZ1"),
        "in/a/2": native_cine(gray(small), "MONOCHROME2", n=12, PatientID="PID-ZZ-1", AccessionNumber="ACCZZ1"),
        "in/b/3": native_cine(gray(small), "MONOCHROME2", n=13, PatientID="PID-ZZ-2", AccessionNumber="ACCZZ2",
                              StudyInstanceUID="1.2.826.0.1.3680043.99999.1.2"),
        "in/c/4": native_cine(gray(small), "MONOCHROME2", n=14, PatientID="PID-ZZ-3", AccessionNumber="ACCZZ3",
                              StudyInstanceUID="1.2.826.0.1.3680043.99999.1.3"),
    }
    for rel, ds in sources.items():
        storage.write_bytes(f"s3://{s3_bucket}/{rel}", to_bytes(ds))
    labels = tmp_path / "labels.csv"
    labels.write_text("accession,label\nACCZZ1,1\nACCZZ2,0\nACCZZ3,\nACCZZ-unknown,1\n")
    manifest_uri = f"s3://{s3_bucket}/manifests/all.csv"
    rc = run_cli([
        f"s3://{s3_bucket}/in", "--out", f"s3://{s3_bucket}/clips", "--manifest-out", manifest_uri,
        "--workers", "1", "--size", "64x96", "--labels", str(labels), "--splits", "0.5,0.25,0.25", "--split-seed", "3",
    ])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    assert "4 file(s) seen, 4 clip(s) in the manifest (4 new, 0 already done), 0 skipped" in captured.out

    table = load_manifest(manifest_uri).table
    assert table["video_uri"].str.startswith(f"s3://{s3_bucket}/clips/videos/").all()
    label = dict(zip(table["patient_id"], table["label"]))
    assert label[hmac_hex("patient", "PID-ZZ-1")] == 1.0 and label[hmac_hex("patient", "PID-ZZ-2")] == 0.0
    assert np.isnan(label[hmac_hex("patient", "PID-ZZ-3")])
    for pid, split in zip(table["patient_id"], table["split"]):
        if pid == hmac_hex("patient", "PID-ZZ-3"):
            assert split == "unlabeled"
        else:
            assert split == split_for_patient(pid, (0.5, 0.25, 0.25), 3)
    for uri in table["video_uri"]:
        info = probe(storage.read_bytes(uri), uri)
        assert (info.n_frames, info.height, info.width) == (10, 64, 96)
    objects = all_objects(s3_bucket)
    written = [v.decode() for k, v in objects.items() if k.endswith((".csv", ".json"))]
    assert_no_phi([*objects, *written, captured.out, captured.err], extra=("PID-ZZ-", "ACCZZ"))


def test_ingest_refuses_without_a_key(tmp_path, s3_bucket, monkeypatch, capfd):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.dcm").write_bytes(to_bytes(real_cine()))
    monkeypatch.delenv(ID_KEY_ENV, raising=False)
    assert run_cli([str(tmp_path / "src"), "--out", f"s3://{s3_bucket}/clips"]) == 2
    assert ID_KEY_ENV in capfd.readouterr().err
    monkeypatch.setenv(ID_KEY_ENV, "short")
    with pytest.raises(IngestError, match="at least 16"):
        ingest(IngestOptions(src=str(tmp_path / "src"), out=f"s3://{s3_bucket}/clips"))
    assert storage.list_prefix(f"s3://{s3_bucket}/") == []

    # A key file (local or s3://) serves as well, and is never copied to the output.
    key_file = tmp_path / "id.key"
    key_file.write_text(KEY + "\n")
    summary = ingest(IngestOptions(src=str(tmp_path / "src"), out=str(tmp_path / "out"), id_key_file=str(key_file)))
    assert summary.rows == 1
    written = [p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written and not any(KEY.encode() in data for data in written)

    # The cluster way (docs/cluster.md): the key is an object on S3, read with the node's role.
    storage.write_bytes(f"s3://{s3_bucket}/secrets/id.key", (KEY + "\n").encode())
    from_s3 = ingest(IngestOptions(src=str(tmp_path / "src"), out=str(tmp_path / "out-s3"),
                                   id_key_file=f"s3://{s3_bucket}/secrets/id.key"))
    assert from_s3.rows == 1
    assert (tmp_path / "out-s3" / "manifest.csv").read_text() == (tmp_path / "out" / "manifest.csv").read_text()


def test_labels_file_errors_name_rows_not_values(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("study_uid,label\n1.2.3.ZZSECRET,1\n1.2.3.ZZSECRET,0\n")
    with pytest.raises(IngestError) as info:
        load_labels(str(path), "study_uid", "label", KEY.encode())
    assert "row 2" in str(info.value) and "ZZSECRET" not in str(info.value)
    path.write_text("study_uid,label\n1.2.3.ZZSECRET,severe\n")
    with pytest.raises(IngestError, match="row 1: label") as info:
        load_labels(str(path), "study_uid", "label", KEY.encode())
    assert "ZZSECRET" not in str(info.value)
    with pytest.raises(IngestError, match="lacks column"):
        load_labels(str(path), "accession", "label", KEY.encode())
    path.write_text("study_uid,label\n1.2.3.4,1\n1.2.3.5,0\n1.2.3.6,\n")
    assert load_labels(str(path), "study_uid", "label", KEY.encode()) == {
        keyed_hash(KEY.encode(), "study", "1.2.3.4"): 1.0,
        keyed_hash(KEY.encode(), "study", "1.2.3.5"): 0.0,
    }


def test_headerless_labels_file_is_refused_without_showing_accessions(tmp_path, key, capfd):
    """Issue 17, item 5: a labels CSV without its header row has accession numbers where the column
    names belong; ``echo-ssl ingest`` refuses it naming the file and the missing columns, and no
    accession reaches stdout or stderr (ingest writes no MLflow run)."""
    (tmp_path / "src").mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("ACC-ZZ-0012345,1\nACC-ZZ-0012346,0\n")
    rc = run_cli([str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--labels", str(labels)])
    captured = capfd.readouterr()
    assert rc == 2
    assert f"labels file {labels} lacks column(s) accession, label" in captured.err
    assert "ACC-ZZ" not in captured.out + captured.err
    assert not (tmp_path / "out").exists()


def test_patient_split_is_seeded_stable_and_proportional():
    patients = [hmac_hex("patient", str(i)) for i in range(3000)]
    splits = [split_for_patient(p, (0.7, 0.1, 0.2), seed=0) for p in patients]
    counts = pd.Series(splits).value_counts(normalize=True)
    assert counts["train"] == pytest.approx(0.7, abs=0.03)
    assert counts["val"] == pytest.approx(0.1, abs=0.03)
    assert counts["test"] == pytest.approx(0.2, abs=0.03)
    assert splits == [split_for_patient(p, (0.7, 0.1, 0.2), seed=0) for p in patients]
    other = [split_for_patient(p, (0.7, 0.1, 0.2), seed=1) for p in patients]
    assert sum(a != b for a, b in zip(splits, other)) > 600
    assert {split_for_patient(p, (0.0, 0.0, 1.0), seed=5) for p in patients[:50]} == {"test"}


def crash_on_file_2(task: _Task) -> Outcome:
    """Stands in for the per-file work in pool workers: the process really dies (os._exit) on
    file 2. Injected because no DICOM at hand crashes a decoder on cue."""
    if task.position == 2:
        os._exit(3)
    return Outcome(task.position, task.name, task.source_id, "ingested", row={"video": f"v{task.position}"})


def test_a_dying_worker_costs_only_its_own_file(caplog):
    tasks = [_Task(i, 7, f"/none/{i}", f"{i:032x}", "/none/out", (112, 112), KEY.encode()) for i in range(1, 8)]
    outcomes = list(_run_pool(tasks, 2, crash_on_file_2))
    status = {o.position: o.status for o in outcomes}
    assert len(outcomes) == 7
    assert status == {1: "ingested", 2: "skipped", 3: "ingested", 4: "ingested", 5: "ingested", 6: "ingested", 7: "ingested"}
    assert [o.reason for o in outcomes if o.position == 2] == ["worker_crashed"]
    assert any("worker process died" in r.getMessage() for r in caplog.records)


def test_a_trusted_region_box_keeps_no_burned_in_text_in_the_clip(tmp_path, key):
    """Issue 17 item 2 end to end: the real cine with its region box set to (0,0)-(319,219)
    (which holds "PLA / Gen THI", "MI 0.9 TIS 0.7" and the depth scale) comes out with nothing
    beyond the estimated fan but H.264 ringing, and with the fan's content."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "boxed.dcm").write_bytes(to_bytes(with_regions(real_cine(), (0, 0, 319, 219, 1))))
    summary = ingest(IngestOptions(src=str(src), out=str(tmp_path / "out")))
    table = load_manifest(summary.manifest_uri).table
    assert list(table["sector"]) == ["regions+estimated"]
    uri = table["video_uri"].item()
    clip = decode_frames(storage.read_bytes(uri), range(30), uri).astype(int)
    source = gray(real_rgb())
    kept = fan.estimate_sector(source) & fan.regions_mask(((0, 0, 319, 219),), source.shape[1:])
    expected = fan.crop_to_sector(source, kept, (112, 112)).astype(int)
    beyond = ~ndimage.binary_dilation(expected.max(axis=0) > 0, iterations=3)
    assert beyond.sum() > 1500 and clip[:, beyond].max() <= 8
    assert np.abs(clip - expected).mean() < 3.0
