"""Object storage: S3 against the moto server over HTTP on 127.0.0.1, and local paths."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from conftest import free_port
from echo.data import storage


def test_s3_round_trip(s3_bucket: str) -> None:
    data = bytes(range(256)) * 1200 + b"\x00\xff"  # ~300 KB of every byte value
    uri = f"s3://{s3_bucket}/deep/er/blob.bin"
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    storage.write_bytes(uri, b"")  # overwrite, and an empty object
    assert storage.read_bytes(uri) == b""


def test_s3_list_prefix_is_sorted_recursive_and_respects_the_boundary(s3_bucket: str) -> None:
    b = f"s3://{s3_bucket}"
    for key in ["a/z.mp4", "ab/x", "a/m/n/deep.mp4", "b/q", "a/b.mp4", "a"]:
        storage.write_bytes(f"{b}/{key}", key.encode())
    expected = [f"{b}/a/b.mp4", f"{b}/a/m/n/deep.mp4", f"{b}/a/z.mp4"]
    assert storage.list_prefix(f"{b}/a") == expected
    assert storage.list_prefix(f"{b}/a/") == expected
    assert storage.list_prefix(f"{b}/a/m") == [f"{b}/a/m/n/deep.mp4"]
    assert storage.list_prefix(f"{b}/nothing") == []
    everything = storage.list_prefix(b)
    assert everything == sorted(everything) and len(everything) == 6


def test_s3_exists_and_missing_object(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/here/x.bin"
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"x")
    assert storage.exists(uri)
    assert not storage.exists(f"s3://{s3_bucket}/here")  # a "folder" is not an object
    missing = f"s3://{s3_bucket}/here/missing.bin"
    with pytest.raises(FileNotFoundError, match=missing):
        storage.read_bytes(missing)


def test_s3_errors_name_the_uri(s3_server: str) -> None:
    uri = "s3://no-such-bucket-echo-ssl/k.bin"
    with pytest.raises(storage.StorageError, match=uri):
        storage.write_bytes(uri, b"x")
    with pytest.raises(storage.StorageError, match="not an s3:// URI"):
        storage.split_s3("s3:///key-without-bucket")
    assert storage.split_s3("s3://bkt/a/b.mp4") == ("bkt", "a/b.mp4")


def test_echo_ssl_endpoint_overrides_aws_endpoint_url(s3_bucket: str, s3_server: str, monkeypatch) -> None:
    uri = f"s3://{s3_bucket}/endpoint.bin"
    storage.write_bytes(uri, b"via the real server")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.delenv("ECHO_SSL_S3_ENDPOINT", raising=False)
    assert storage.s3_client().meta.endpoint_url == closed  # without the override the closed port is used
    monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", s3_server)
    assert storage.s3_client().meta.endpoint_url == s3_server
    assert storage.read_bytes(uri) == b"via the real server"
    assert storage.exists(uri)
    assert storage.list_prefix(f"s3://{s3_bucket}") == [uri]


def test_local_write_is_atomic_and_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c" / "file.bin"
    storage.write_bytes(str(target), b"first")
    assert target.read_bytes() == b"first"
    storage.write_bytes(str(target), b"second")
    assert storage.read_bytes(str(target)) == b"second"
    assert os.listdir(target.parent) == ["file.bin"]  # no temporary file left behind
    assert storage.exists(str(target)) and not storage.exists(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        storage.read_bytes(str(tmp_path / "nope"))


def test_local_list_prefix_is_recursive_and_sorted(tmp_path: Path) -> None:
    for rel in ["z.mp4", "a/b/c.mp4", "a/a.mp4", "m.csv"]:
        storage.write_bytes(str(tmp_path / "root" / rel), b"")
    (tmp_path / "root" / "empty-folder").mkdir()
    storage.write_bytes(str(tmp_path / "rootless" / "x"), b"")  # a sibling sharing the name's start
    root = tmp_path / "root"
    assert storage.list_prefix(str(root)) == [
        str(root / "a" / "a.mp4"), str(root / "a" / "b" / "c.mp4"), str(root / "m.csv"), str(root / "z.mp4")
    ]
    assert storage.list_prefix(str(tmp_path / "absent")) == []


@pytest.mark.parametrize(
    "base,rel,expected",
    [
        ("s3://b/ds", "videos/a.mp4", "s3://b/ds/videos/a.mp4"),
        ("s3://b/ds/", "videos/a.mp4", "s3://b/ds/videos/a.mp4"),
        ("s3://b", "a.mp4", "s3://b/a.mp4"),
        ("s3://b/ds", "s3://other/k.mp4", "s3://other/k.mp4"),
        ("/data/ds", "videos/a.mp4", "/data/ds/videos/a.mp4"),
        ("/data/ds", "./videos/a.mp4", "/data/ds/videos/a.mp4"),
        ("/data/ds", "/elsewhere/a.mp4", "/elsewhere/a.mp4"),
        ("/data/ds", "s3://b/k.mp4", "s3://b/k.mp4"),
        ("ds", "a.mp4", "ds/a.mp4"),
    ],
)
def test_join(base: str, rel: str, expected: str) -> None:
    assert storage.join(base, rel) == expected


def test_local_concurrent_writers_of_one_path(tmp_path: Path) -> None:
    target = tmp_path / "shared" / "manifest.csv"
    payloads = [bytes([i]) * 4096 for i in range(8)]
    errors: list[BaseException] = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(40):
                storage.write_bytes(str(target), data)
        except BaseException as e:  # collected: a failure in a thread must fail the test
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert target.read_bytes() in payloads  # whole, never a mix
    assert os.listdir(target.parent) == ["manifest.csv"]


def test_local_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "target").mkdir()  # a folder where the file should go: the final rename fails
    with pytest.raises(OSError):
        storage.write_bytes(str(tmp_path / "f" / "target"), b"data")
    assert os.listdir(tmp_path / "f") == ["target"]
