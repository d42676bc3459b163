"""Object reads through ``echo.data.s3http``: SigV4 presigning equal to botocore's, kept-alive
connections, retries and their limits, proxies and TLS, against the moto server and the
fault-injecting proxy over real sockets on 127.0.0.1."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import boto3
import pytest
from botocore.config import Config
from botocore.credentials import Credentials

from conftest import free_port, start_moto, stop_process_group
from echo.data import s3http
from echo.data import storage
from faultproxy import OTHER_REGION, FaultProxy

ODD_KEYS = ["plain/v.mp4", "a b/c+d=e&f.mp4", "ü/é~x", "x//y", "a%20b", "q?x#y", "-._~!$'()*,;:@"]


@pytest.mark.parametrize("token", [None, "session/token+=="])
@pytest.mark.parametrize(
    "endpoint, region",
    [("http://127.0.0.1:9000", "us-east-1"), (None, "eu-west-1"), ("https://minio.example:443", "us-west-2")],
)
def test_presigned_urls_are_the_ones_botocore_makes(endpoint, region, token) -> None:
    session = boto3.session.Session(
        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="wJalr/K7MDENG+bPxRfiCY", aws_session_token=token
    )
    client = session.client("s3", endpoint_url=endpoint, region_name=region, config=Config(signature_version="s3v4"))
    credentials = Credentials("AKIDEXAMPLE", "wJalr/K7MDENG+bPxRfiCY", token)
    for key in ODD_KEYS:
        theirs = client.generate_presigned_url("get_object", Params={"Bucket": "my-bucket", "Key": key}, ExpiresIn=900)
        stamp = parse_qs(urlsplit(theirs).query)["X-Amz-Date"][0]
        now = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
        prefix = theirs.split("?")[0][: -len(quote(key.encode(), safe="/~"))]
        assert s3http.presign(prefix, key, credentials, region, 900, now=now) == theirs, key


def test_presign_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="expires_s"):
        s3http.presign("http://h/b/", "k", Credentials("a", "b"), "us-east-1", 0)


@pytest.fixture
def objects(s3_bucket) -> dict[str, bytes]:
    """Five objects (odd keys among them) written through boto3: ``{uri: bytes}``."""
    out = {}
    for i, key in enumerate(["v0.mp4", "dir/v 1.mp4", "ü/v2.mp4", "v+3.mp4", "deep/er/v4.mp4"]):
        uri = f"s3://{s3_bucket}/{key}"
        out[uri] = bytes([i]) * (50_000 + 7919 * i)
        storage.write_bytes(uri, out[uri])
    return out


def test_reads_reuse_one_kept_alive_connection(s3_server, objects, monkeypatch) -> None:
    with FaultProxy(s3_server, every=0, faults=()) as proxy:
        monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", proxy.url)
        before = proxy.stats()["connections"]
        for _ in range(4):
            for uri, data in objects.items():
                assert storage.read_bytes(uri) == data
        stats = proxy.stats()
    assert stats["object_gets"] == 20
    assert stats["connections"] - before == 2  # one for the 20 GETs, one for this stats request


def test_a_connection_the_server_closed_while_idle_is_reopened_without_a_retry(s3_server, objects, monkeypatch) -> None:
    uri, data = next(iter(objects.items()))
    monkeypatch.setattr(storage, "MAX_ATTEMPTS", 1)  # a counted retry would fail the read
    port = free_port()
    monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    with FaultProxy(s3_server, every=0, faults=(), port=port):
        assert storage.read_bytes(uri) == data
    with FaultProxy(s3_server, every=0, faults=(), port=port) as proxy:  # the kept socket now leads nowhere
        assert storage.read_bytes(uri) == data
        assert proxy.stats()["object_gets"] == 1


def test_a_fault_that_outlasts_the_attempts_is_an_error_naming_the_object(s3_server, objects, monkeypatch) -> None:
    uri = next(iter(objects))
    monkeypatch.setattr(storage, "MAX_ATTEMPTS", 3)
    with FaultProxy(s3_server, every=1, faults=("503",)) as proxy:
        monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", proxy.url)
        with pytest.raises(storage.StorageError, match=r"HTTP 503 SlowDown \(after 3 attempts\)") as err:
            storage.read_bytes(uri)
        assert proxy.stats()["object_gets"] == 3
    assert uri in str(err.value)


@pytest.mark.parametrize("fault", ["reset", "truncate"])
def test_transport_faults_are_retried_until_the_attempts_run_out(s3_server, objects, monkeypatch, fault) -> None:
    uri = next(iter(objects))
    monkeypatch.setattr(storage, "MAX_ATTEMPTS", 2)
    with FaultProxy(s3_server, every=1, faults=(fault,)) as proxy:
        monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", proxy.url)
        with pytest.raises(storage.StorageError, match=r"(Reset|closed).*\(after 2 attempts\)"):
            storage.read_bytes(uri)
        assert proxy.stats()["object_gets"] == 2


def test_an_answer_slower_than_the_read_timeout_is_abandoned_and_retried(s3_server, objects, monkeypatch) -> None:
    uri, data = next(iter(objects.items()))
    monkeypatch.setattr(s3http, "READ_TIMEOUT_S", 0.5)
    with FaultProxy(s3_server, every=2, faults=("slow",), delay=5.0) as proxy:
        monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", proxy.url)
        assert storage.read_bytes(uri) == data
        started = time.monotonic()
        assert storage.read_bytes(uri) == data  # the 2nd GET hangs; the 3rd answers
        elapsed = time.monotonic() - started
        assert proxy.stats()["object_gets"] == 3
    assert 0.5 <= elapsed < 3


@pytest.mark.parametrize(
    "fault, message",
    [("403", r"HTTP 403 AccessDenied$"), ("region", rf"HTTP 400 AuthorizationHeaderMalformed \(the bucket is in {OTHER_REGION}: set AWS_DEFAULT_REGION={OTHER_REGION}\)$")],
)
def test_an_answer_no_retry_can_mend_is_not_retried(s3_server, objects, monkeypatch, fault, message) -> None:
    uri = next(iter(objects))
    with FaultProxy(s3_server, every=1, faults=(fault,)) as proxy:
        monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", proxy.url)
        with pytest.raises(storage.StorageError, match=message):
            storage.read_bytes(uri)
        assert proxy.stats()["object_gets"] == 1


def _no_proxy_variables(monkeypatch) -> None:
    for name in s3http._PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_plain_http_goes_through_the_http_proxy_unless_no_proxy_says_otherwise(s3_server, objects, monkeypatch) -> None:
    _no_proxy_variables(monkeypatch)
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


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def tls_s3(tmp_path, monkeypatch):
    """A moto server speaking TLS on 127.0.0.1 with its own CA; ``(endpoint URL, CA file)``."""
    cert, key = _self_signed(tmp_path, "moto-tls")
    proc, port = start_moto("--ssl-cert", str(cert), "--ssl-key", str(key))
    try:
        _no_proxy_variables(monkeypatch)
        monkeypatch.setenv("ECHO_SSL_S3_ENDPOINT", f"https://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
        yield f"https://127.0.0.1:{port}", cert
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

    other_ca, _ = _self_signed(tmp_path, "someone-else")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(other_ca))
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="certificate verify failed|self.signed") as err:
        storage.read_bytes(uri)
    assert "AWS_CA_BUNDLE" in str(err.value) and uri in str(err.value)
    assert time.monotonic() - started < 3  # refused at once, not retried with backoff
