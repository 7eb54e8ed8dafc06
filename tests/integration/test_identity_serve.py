"""Signed identity documents from a real ``meta169 serve``, checked by our CLI and by
the ``openssl`` commands the EC2 user guide gives guests ("Verify the instance identity
document")."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.capabilities import require
from tests.integration.serving import ServeProcess, get, imported_registry, meta169_argv, run_cli, start_serve

UUID = "11111111-1111-4111-8111-111111111111"
INVENTORY = f"""
networks:
  - id: net-a
    project_id: proj-a
    subnets: [{{cidr: 127.0.0.0/24, gateway: 127.0.0.254, dhcp: true}}]
instances:
  - uuid: {UUID}
    name: alpha
    project_id: proj-a
    ports: [{{network: net-a, mac: "fa:16:3e:00:00:0a", ips: [127.0.0.5]}}]
"""
BASE = "/latest/dynamic/instance-identity/"
FORMS = ("document", "pkcs7", "rsa2048", "signature")
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.usefixtures("openssl_cli")


@pytest.fixture(scope="module")
def openssl_cli() -> None:
    require("openssl", OPENSSL is not None, "the EC2 user guide's verification commands run the openssl CLI")


@dataclass
class Served:
    server: ServeProcess
    key_dir: Path
    files: Path  # one file per served form, plus cert.pem from `meta169 identity cert`


@pytest.fixture(scope="module")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("identity-registry")
    url = imported_registry(tmp, INVENTORY)
    return url


@pytest.fixture(scope="module")
def served(registry_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("identity")
    key_dir = tmp / "key"
    run_cli(registry_url, "identity", "init", "--dir", str(key_dir), "--account", "123456789012")
    server = start_serve(registry_url, ["127.0.0.1:0=network:net-a"], "--identity-key-dir", str(key_dir))
    try:
        files = tmp / "served"
        files.mkdir()
        for form in FORMS:
            status, _, body = get(server.addresses[0], BASE + form, source="127.0.0.5")
            assert status == 200, (form, body)
            (files / form).write_bytes(body)
        cert = run_cli(registry_url, "identity", "cert", "--dir", str(key_dir)).stdout
        (files / "cert.pem").write_text(cert)
        yield Served(server, key_dir, files)
    finally:
        server.stop()


def _verify(registry_url: str, files: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(registry_url, "identity", "verify", "--cert", str(files / "cert.pem"), *args, check=False)


def _openssl(*args: str, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *args], cwd=cwd, input=stdin, capture_output=True, timeout=30, check=False)


def test_identity_serve_lists_every_form_and_serves_each(served: Served) -> None:
    address = served.server.addresses[0]
    status, headers, body = get(address, BASE, source="127.0.0.5")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert body.decode().split("\n") == list(FORMS)
    for version in ("2009-04-04", "2021-03-23", "latest"):
        status, headers, body = get(address, f"/{version}/dynamic/instance-identity/pkcs7", source="127.0.0.5")
        assert status == 200 and body == (served.files / "pkcs7").read_bytes()
        assert headers["content-type"].startswith("text/plain")
    assert b'"instanceId" : "' + UUID.encode() + b'"' in (served.files / "document").read_bytes()
    assert b'"accountId" : "000000000000"' in (served.files / "document").read_bytes()


def test_identity_serve_cli_verify_accepts_what_serve_signed(registry_url: str, served: Served) -> None:
    files = served.files
    result = _verify(
        registry_url,
        files,
        "--document",
        str(files / "document"),
        "--signature",
        str(files / "signature"),
        "--pkcs7",
        str(files / "pkcs7"),
        "--rsa2048",
        str(files / "rsa2048"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": OK:") == 3
    assert f"instanceId {UUID}" in result.stdout


def test_identity_serve_cli_verify_rejects_a_modified_document(
    registry_url: str, served: Served, tmp_path: Path
) -> None:
    forged = (served.files / "document").read_bytes().replace(b"127.0.0.5", b"127.0.0.6")
    assert forged != (served.files / "document").read_bytes()
    (tmp_path / "document").write_bytes(forged)
    result = _verify(
        registry_url,
        served.files,
        "--document",
        str(tmp_path / "document"),
        "--signature",
        str(served.files / "signature"),
        "--pkcs7",
        str(served.files / "pkcs7"),
    )
    assert result.returncode == 1
    assert "signature: FAILED" in result.stdout and "pkcs7: FAILED" in result.stdout


def test_identity_serve_cli_verify_rejects_another_operators_cert(
    registry_url: str, served: Served, tmp_path: Path
) -> None:
    run_cli(registry_url, "identity", "init", "--dir", str(tmp_path / "other"))
    files = served.files
    result = run_cli(
        registry_url,
        "identity",
        "verify",
        "--cert",
        str(tmp_path / "other" / "identity-cert.pem"),
        "--document",
        str(files / "document"),
        "--signature",
        str(files / "signature"),
        "--pkcs7",
        str(files / "pkcs7"),
        check=False,
    )
    assert result.returncode == 1, result.stdout


@needs_openssl
def test_identity_serve_openssl_dgst_accepts_signature(served: Served, tmp_path: Path) -> None:
    # EC2 user guide, "Verify ... using the base64-encoded signature".
    files = served.files
    pub = _openssl("x509", "-pubkey", "-noout", "-in", str(files / "cert.pem"), "-out", "pub.pem", cwd=tmp_path)
    assert pub.returncode == 0, pub.stderr
    (tmp_path / "sig.bin").write_bytes(_b64decode(files / "signature"))
    ok = _openssl(
        "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.bin", str(files / "document"), cwd=tmp_path
    )
    assert ok.returncode == 0 and b"Verified OK" in ok.stdout, ok.stderr
    (tmp_path / "forged").write_bytes((files / "document").read_bytes() + b" ")
    bad = _openssl("dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.bin", "forged", cwd=tmp_path)
    assert bad.returncode == 1 and b"Verification failure" in bad.stdout


@needs_openssl
@pytest.mark.parametrize("form", ["pkcs7", "rsa2048"])
def test_identity_serve_openssl_smime_accepts_pkcs7(served: Served, tmp_path: Path, form: str) -> None:
    # EC2 user guide, "Verify ... using the PKCS7 signature": add the PEM armour, then
    # smime -verify prints the document it carries. -nointern: trust only -certfile.
    files = served.files
    armoured = b"-----BEGIN PKCS7-----\n" + (files / form).read_bytes() + b"\n-----END PKCS7-----\n"
    (tmp_path / "p7.pem").write_bytes(armoured)
    cert = str(files / "cert.pem")
    out = _openssl(
        "smime", "-verify", "-in", "p7.pem", "-inform", "PEM", "-certfile", cert, "-nointern", "-noverify", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert b"Verification successful" in out.stderr
    assert out.stdout == (files / "document").read_bytes()
    # the certificate also works as the trust anchor, without -noverify
    anchored = _openssl(
        "smime",
        "-verify",
        "-in",
        "p7.pem",
        "-inform",
        "PEM",
        "-certfile",
        cert,
        "-nointern",
        "-CAfile",
        cert,
        "-purpose",
        "any",
        cwd=tmp_path,
    )
    assert anchored.returncode == 0, anchored.stderr
    cms = _openssl(
        "cms",
        "-verify",
        "-in",
        "p7.pem",
        "-inform",
        "PEM",
        "-certfile",
        cert,
        "-nointern",
        "-noverify",
        "-binary",
        cwd=tmp_path,
    )
    assert cms.returncode == 0 and cms.stdout == out.stdout, cms.stderr


@needs_openssl
def test_identity_serve_openssl_smime_rejects_another_cert(served: Served, tmp_path: Path, registry_url: str) -> None:
    run_cli(registry_url, "identity", "init", "--dir", str(tmp_path / "other"))
    armoured = b"-----BEGIN PKCS7-----\n" + (served.files / "pkcs7").read_bytes() + b"\n-----END PKCS7-----\n"
    (tmp_path / "p7.pem").write_bytes(armoured)
    out = _openssl(
        "smime",
        "-verify",
        "-in",
        "p7.pem",
        "-inform",
        "PEM",
        "-nointern",
        "-noverify",
        "-certfile",
        str(tmp_path / "other" / "identity-cert.pem"),
        cwd=tmp_path,
    )
    assert out.returncode != 0
    assert b"Verification successful" not in out.stderr


@needs_openssl
@pytest.mark.parametrize(
    ("keygen", "digest"),
    [
        # AWS's own legacy pkcs7 form: DSA and SHA-1 (AWS uses a 1024-bit DSA certificate).
        (["genpkey", "-genparam", "-algorithm", "DSA", "-pkeyopt", "dsa_paramgen_bits:1024", "-out", "p.pem"], "sha1"),
        (["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "k.pem"], "sha256"),
    ],
    ids=["dsa-sha1", "rsa-sha256"],
)
def test_identity_cli_verify_accepts_openssl_made_pkcs7(
    registry_url: str, served: Served, tmp_path: Path, keygen: list[str], digest: str
) -> None:
    # The other direction: a SignedData built by OpenSSL (with SMIMECapabilities and
    # an embedded certificate) passes our verifier, and fails against another cert.
    assert _openssl(*keygen, cwd=tmp_path).returncode == 0
    if keygen[1] == "-genparam":
        assert _openssl("genpkey", "-paramfile", "p.pem", "-out", "k.pem", cwd=tmp_path).returncode == 0
    made = _openssl(
        "req", "-x509", "-new", "-key", "k.pem", "-subj", "/CN=elsewhere", "-days", "1", "-out", "c.pem", cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    signed = _openssl(
        "smime",
        "-sign",
        "-in",
        str(served.files / "document"),
        "-signer",
        "c.pem",
        "-inkey",
        "k.pem",
        "-md",
        digest,
        "-nodetach",
        "-binary",
        "-outform",
        "PEM",
        "-out",
        "p7.pem",
        cwd=tmp_path,
    )
    assert signed.returncode == 0, signed.stderr
    argv = ("--document", str(served.files / "document"), "--pkcs7", str(tmp_path / "p7.pem"))
    good = run_cli(registry_url, "identity", "verify", "--cert", str(tmp_path / "c.pem"), *argv, check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"({digest.upper().replace('SHA', 'SHA-')})" in good.stdout
    assert _verify(registry_url, served.files, *argv).returncode == 1


def test_identity_serve_without_key_serves_the_document_unsigned(registry_url: str) -> None:
    server = start_serve(registry_url, ["127.0.0.1:0=network:net-a"])
    try:
        status, _, body = get(server.addresses[0], BASE, source="127.0.0.5")
        assert (status, body) == (200, b"document")
        status, _, _ = get(server.addresses[0], BASE + "signature", source="127.0.0.5")
        assert status == 404
    finally:
        server.stop()


def test_identity_serve_refuses_a_key_readable_by_others(registry_url: str, tmp_path: Path) -> None:
    run_cli(registry_url, "identity", "init", "--dir", str(tmp_path / "key"))
    os.chmod(tmp_path / "key" / "identity-key.pem", 0o640)
    argv = meta169_argv(
        "--registry",
        registry_url,
        "serve",
        "--listen",
        "127.0.0.1:0=network:net-a",
        "--identity-key-dir",
        str(tmp_path / "key"),
    )
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "chmod 600" in result.stderr
    assert "listening" not in result.stderr


def _b64decode(path: Path) -> bytes:
    return base64.b64decode(b"".join(path.read_bytes().split()))
