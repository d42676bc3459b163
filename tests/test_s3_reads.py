"""Object reads through obstore (``echo.data.storage.read_bytes``): what boto3 reaches, reads
reach too (path and virtual-host addressing, profile credentials, proxies, a private CA), with
the retries and limits of the read path; against the moto server and the fault-injecting proxy
over real sockets on 127.0.0.1."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import start_moto, stop_process_group
from echo.data import storage
from faultproxy import FaultProxy

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def no_proxy_variables(monkeypatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def objects(s3_bucket) -> dict[str, bytes]:
    """Five objects (odd keys among them) written through boto3: ``{uri: bytes}``."""
    out = {}
    for i, key in enumerate(["v0.mp4", "dir/v 1.mp4", "ü/v2.mp4", "v+3.mp4", "deep/er/v4.mp4"]):
        uri = f"s3://{s3_bucket}/{key}"
        out[uri] = bytes([i]) * (50_000 + 7919 * i)
        storage.write_bytes(uri, out[uri])
    return out


def test_reads_keep_their_connections_pooled(s3_server, objects, monkeypatch) -> None:
    with FaultProxy(s3_server, every=0, faults=()) as proxy:
        monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", proxy.url)
        opened = []
        for _ in range(2):
            before = proxy.stats()["connections"]
            for _ in range(4):
                for uri, data in objects.items():
                    assert storage.read_bytes(uri) == data
            opened.append(proxy.stats()["connections"] - before - 1)  # less the stats request's own
        assert proxy.stats()["object_gets"] == 40
    # one store per thread: its pool may open another connection while one is being handed
    # back (more often on a busy machine), and keeps them all for the next reads
    assert 1 <= opened[0] < 20 and opened[1] <= 2, opened


@pytest.mark.parametrize("fault", ["503", "reset", "truncate"])
def test_a_fault_that_outlasts_the_attempts_is_an_error_naming_the_object(s3_server, objects, monkeypatch, fault) -> None:
    uri = next(iter(objects))
    monkeypatch.setattr(storage, "MAX_ATTEMPTS", 3)
    with FaultProxy(s3_server, every=1, faults=(fault,)) as proxy:
        monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", proxy.url)
        with pytest.raises(storage.StorageError) as err:
            storage.read_bytes(uri)
        gets = proxy.stats()["object_gets"]
    assert str(err.value).startswith(f"reading {uri} failed"), str(err.value)
    assert gets == 3, (gets, str(err.value))
    if fault == "503":
        assert "503" in str(err.value) and "SlowDown" in str(err.value) and "<?xml" not in str(err.value)


def test_an_answer_no_retry_can_mend_is_not_retried(s3_server, objects, monkeypatch) -> None:
    uri = next(iter(objects))
    with FaultProxy(s3_server, every=1, faults=("403",)) as proxy:
        monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", proxy.url)
        with pytest.raises(storage.StorageError, match="403.*AccessDenied"):
            storage.read_bytes(uri)
        assert proxy.stats()["object_gets"] == 1


def test_an_answer_slower_than_the_read_timeout_is_abandoned_and_retried(s3_server, objects, monkeypatch) -> None:
    uri, data = next(iter(objects.items()))
    monkeypatch.setattr(storage, "READ_TIMEOUT_S", 0.5)
    with FaultProxy(s3_server, every=2, faults=("slow",), delay=5.0) as proxy:
        monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", proxy.url)
        assert storage.read_bytes(uri) == data
        started = time.monotonic()
        assert storage.read_bytes(uri) == data  # the 2nd GET hangs; the 3rd answers
        elapsed = time.monotonic() - started
        assert proxy.stats()["object_gets"] == 3
    assert 0.5 <= elapsed < 3


def test_an_object_over_the_cap_is_refused_from_its_size(objects) -> None:
    uri, data = next(iter(objects.items()))
    with pytest.raises(storage.ObjectTooLarge, match="over the") as err:
        storage.read_bytes(uri, max_bytes=len(data) - 1)
    assert (err.value.uri, err.value.size) == (uri, len(data))
    assert storage.read_bytes(uri, max_bytes=len(data)) == data  # the pooled connection still serves


def test_plain_http_goes_through_the_http_proxy_unless_no_proxy_says_otherwise(s3_server, objects, monkeypatch) -> None:
    with FaultProxy(s3_server, every=0, faults=()) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("http://", "http://reader:p%40ss@"))
        for uri, data in objects.items():
            assert storage.read_bytes(uri) == data
        through = proxy.stats()
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        for uri, data in objects.items():
            assert storage.read_bytes(uri) == data
        assert proxy.stats()["object_gets"] == through["object_gets"]
    assert through["object_gets"] == through["absolute_form"] == len(objects)
    assert through["proxy_authorizations"] == ["Basic " + base64.b64encode(b"reader:p@ss").decode()]


def test_virtual_host_addressing_and_refreshable_profile_credentials(s3_server, tmp_path, monkeypatch) -> None:
    """A profile whose credentials come from a ``credential_process`` (refreshable, as an
    instance role's are) and whose S3 addressing is virtual-host; the endpoint's name exists
    only behind the proxy, which forwards to moto with the bucket in the Host header."""
    expires = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=30)).isoformat()
    answer = {"Version": 1, "AccessKeyId": "AKIAPROFILEREADER7Q3Z", "SecretAccessKey": "s3cr3t", "SessionToken": "t",
              "Expiration": expires}
    (tmp_path / "creds.json").write_text(json.dumps(answer))
    (tmp_path / "config").write_text(
        "[profile reader]\n"
        f"credential_process = {sys.executable} -c \"print(open('{tmp_path / 'creds.json'}').read())\"\n"
        "s3 =\n    addressing_style = virtual\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-such-file"))
    monkeypatch.setenv("AWS_PROFILE", "reader")
    monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", "http://s3.echo.test")
    with FaultProxy(s3_server, every=0, faults=()) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        storage.s3_client().create_bucket(Bucket="vhost-bucket")
        uri, data = "s3://vhost-bucket/a/v.mp4", os.urandom(70_000)
        storage.write_bytes(uri, data)
        assert storage._bucket_url(storage._s3(), "vhost-bucket") == "http://vhost-bucket.s3.echo.test/"
        assert storage.read_bytes(uri) == data
        stats = proxy.stats()
    assert stats["object_gets"] == 1 and stats["access_keys"] == ["AKIAPROFILEREADER7Q3Z"]


def test_a_child_forked_after_reads_reads_too(objects) -> None:
    """obstore's I/O threads do not survive fork: the child must not hang in its first read."""
    uri, data = next(iter(objects.items()))
    assert storage.read_bytes(uri) == data  # obstore's threads now run in this process
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's exit handlers
        code = 1
        try:
            signal.alarm(20)
            os.write(write_end, b"ok" if storage.read_bytes(uri) == data else b"different")
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as f:
        assert (f.read(), os.waitstatus_to_exitcode(status)) == (b"ok", 0)


def _ca_and_leaf(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A private CA and a certificate it signed for 127.0.0.1: ``(CA file, certificate, key)``, PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, issuer, public_key, signer, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = certificate(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    leaf = certificate(leaf_name, ca_name, key.public_key(), ca_key, ca=False)
    paths = folder / f"{name}-ca.pem", folder / f"{name}.pem", folder / f"{name}.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.fixture
def tls_s3(tmp_path, monkeypatch):
    """A moto server speaking TLS on 127.0.0.1 with a certificate from a private CA;
    ``(endpoint URL, CA file)``, with ``AWS_CA_BUNDLE`` naming the CA."""
    ca, cert, key = _ca_and_leaf(tmp_path, "moto-tls")
    proc, port = start_moto("--ssl-cert", str(cert), "--ssl-key", str(key))
    try:
        monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", f"https://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
        yield f"https://127.0.0.1:{port}", ca
    finally:
        stop_process_group(proc)


def test_https_reads_check_the_certificate_and_tunnel_through_a_proxy(tls_s3, tmp_path, monkeypatch) -> None:
    endpoint, _ = tls_s3
    storage.s3_client().create_bucket(Bucket="tls-bucket")
    uri, data = "s3://tls-bucket/v.mp4", bytes(range(256)) * 900
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data

    with FaultProxy(endpoint, every=0, faults=()) as proxy:  # CONNECT only: the proxy never sees the bytes
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        assert storage.read_bytes(uri) == data
        assert proxy.stats()["tunnels"] >= 1
        monkeypatch.delenv("HTTPS_PROXY")

    other_ca, _, _ = _ca_and_leaf(tmp_path, "someone-else")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(other_ca))
    monkeypatch.setattr(storage, "MAX_ATTEMPTS", 2)
    with pytest.raises(storage.StorageError, match="certificate not trusted") as err:
        storage.read_bytes(uri)
    assert "AWS_CA_BUNDLE" in str(err.value) and uri in str(err.value)


def test_local_reads_refuse_what_is_not_a_regular_file(tmp_path) -> None:
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    started = time.monotonic()
    for path in (str(fifo), "/dev/zero"):
        with pytest.raises(storage.StorageError, match=f"{path} is not a regular file"):
            storage.read_bytes(path)
    assert time.monotonic() - started < 2  # nobody writes to the FIFO: opening it must not wait
    big = tmp_path / "big.mp4"
    big.write_bytes(b"x" * 3000)
    with pytest.raises(storage.ObjectTooLarge):
        storage.read_bytes(str(big), max_bytes=2999)
    assert storage.read_bytes(str(big), max_bytes=3000) == b"x" * 3000
