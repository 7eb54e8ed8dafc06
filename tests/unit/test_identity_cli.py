"""``meta169 identity`` init, cert and verify through click."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from meta169.cli import main
from meta169.identity import CERT_FILE, KEY_FILE, RsaIdentitySigner, load_identity_key
from meta169.lab.plan import LabConfig, LabPaths
from meta169.lab.state import LabState, Status, save

DOCUMENT = b'{\n  "accountId" : "000000000000",\n  "instanceId" : "i-0abc",\n  "region" : "RegionOne"\n}'


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """An identity dir plus the served bodies and the published certificate."""
    runner = CliRunner()
    result = runner.invoke(main, ["identity", "init", "--dir", str(tmp_path / "id")])
    assert result.exit_code == 0, result.output
    signature, p7, rsa2048 = RsaIdentitySigner(load_identity_key(tmp_path / "id"))(DOCUMENT)
    (tmp_path / "document").write_bytes(DOCUMENT)
    (tmp_path / "signature").write_text(signature)
    (tmp_path / "pkcs7").write_text(p7)
    (tmp_path / "rsa2048").write_text(rsa2048)
    cert = runner.invoke(main, ["identity", "cert", "--dir", str(tmp_path / "id")])
    assert cert.exit_code == 0
    (tmp_path / "cert.pem").write_text(cert.output)
    return tmp_path


def _verify(files: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
    base = ["identity", "verify", "--cert", str(files / "cert.pem")]
    result = CliRunner().invoke(main, [*base, *args], input=stdin)
    return result.exit_code, result.output


def test_identity_cli_init_writes_key_and_tells_how_to_serve(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["identity", "init", "--dir", str(tmp_path), "--account", "123456789012"])
    assert result.exit_code == 0
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert f"--identity-key-dir {tmp_path}" in result.output
    again = CliRunner().invoke(main, ["identity", "init", "--dir", str(tmp_path)])
    assert again.exit_code == 2
    assert "already exists" in again.output


def test_identity_cli_cert_prints_only_the_pem(files: Path) -> None:
    text = (files / "cert.pem").read_text()
    assert text.startswith("-----BEGIN CERTIFICATE-----\n")
    assert text.endswith("-----END CERTIFICATE-----\n")
    assert text.count("BEGIN") == 1
    assert (files / "id" / CERT_FILE).read_text() == text


def test_identity_cli_cert_without_key_dir_is_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["identity", "cert", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "meta169 identity init" in result.output


def test_identity_cli_verify_all_forms_exit_0(files: Path) -> None:
    code, out = _verify(
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
    assert code == 0, out
    assert out.count(": OK:") == 3
    assert "identity document verified: instanceId i-0abc, accountId 000000000000, region RegionOne" in out


def test_identity_cli_verify_document_from_stdin(files: Path) -> None:
    code, out = _verify(files, "--document", "-", "--signature", str(files / "signature"), stdin=DOCUMENT)
    assert code == 0, out


def test_identity_cli_verify_pkcs7_alone_uses_its_content(files: Path) -> None:
    code, out = _verify(files, "--pkcs7", str(files / "pkcs7"))
    assert code == 0, out
    assert "(taken from the pkcs7)" in out


def test_identity_cli_verify_modified_document_exit_1(files: Path) -> None:
    (files / "document").write_bytes(DOCUMENT.replace(b"i-0abc", b"i-0abd"))
    code, out = _verify(
        files,
        "--document",
        str(files / "document"),
        "--signature",
        str(files / "signature"),
        "--pkcs7",
        str(files / "pkcs7"),
    )
    assert code == 1
    assert "signature: FAILED" in out and "pkcs7: FAILED" in out
    assert out.rstrip().endswith("identity document NOT verified")


def test_identity_cli_verify_unusable_input_exit_2(files: Path) -> None:
    code, out = _verify(files, "--document", str(files / "document"))
    assert code == 2 and "nothing to verify" in out
    code, out = _verify(files, "--signature", str(files / "signature"))
    assert code == 2 and "no document" in out
    code, out = _verify(files, "--signature", str(files / "missing"))
    assert code == 2
    big = files / "big"
    big.write_bytes(b"A" * ((1 << 20) + 1))
    code, out = _verify(files, "--document", str(files / "document"), "--signature", str(big))
    assert code == 2 and "more than" in out


def _lab_up(root: Path, name: str, status: Status = "up") -> Path:
    """A lab's state file and its identity key, as lab up leaves them (no namespaces needed)."""
    paths = LabPaths(root / name)
    paths.root.mkdir(parents=True)
    save(LabState(LabConfig(name=name, state_dir=paths.root), status=status), paths.state)
    assert CliRunner().invoke(main, ["identity", "init", "--dir", str(paths.identity_dir)]).exit_code == 0
    return paths.identity_dir


def test_identity_cli_cert_of_the_lab_that_is_up_said_on_stderr(tmp_path: Path) -> None:
    lab_dir = _lab_up(tmp_path, "demo")
    _lab_up(tmp_path, "old", status="down")
    result = CliRunner().invoke(main, ["identity", "cert", "--state-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == (lab_dir / CERT_FILE).read_text()
    assert f"the certificate of lab demo ({lab_dir})" in result.stderr
    # One lab's own directory names it too.
    own = CliRunner().invoke(main, ["identity", "cert", "--state-root", str(tmp_path / "demo")])
    assert own.stdout == result.stdout


def test_identity_cli_cert_explicit_dir_wins_over_the_lab(files: Path, tmp_path: Path) -> None:
    _lab_up(tmp_path / "labs", "demo")
    result = CliRunner().invoke(main, ["identity", "cert", "--dir", str(files / "id"),
                                       "--state-root", str(tmp_path / "labs")])  # fmt: skip
    assert result.exit_code == 0
    assert result.stdout == (files / "cert.pem").read_text() and result.stderr == ""


def test_identity_cli_cert_several_labs_up_needs_a_choice(tmp_path: Path) -> None:
    _lab_up(tmp_path, "one")
    two = _lab_up(tmp_path, "two")
    args = ["identity", "cert", "--state-root", str(tmp_path)]
    several = CliRunner().invoke(main, args, env={"META169_LAB": None})
    assert several.exit_code == 2 and "several labs are up" in several.stderr and "--lab NAME" in several.stderr
    chosen = CliRunner().invoke(main, [*args, "--lab", "two"])
    assert chosen.exit_code == 0 and chosen.stdout == (two / CERT_FILE).read_text()
    absent = CliRunner().invoke(main, [*args, "--lab", "three"])
    assert absent.exit_code == 2 and "no lab 'three' is up" in absent.stderr
