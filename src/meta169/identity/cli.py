"""``meta169 identity``: init, cert, verify. A thin click layer over :mod:`meta169.identity`.

Exit codes are those of :mod:`meta169.cli`: ``verify`` exits 0 when every signature
given is valid, 1 when one is not, 2 for unusable input (an unreadable file, a
certificate that is not PEM, nothing to verify).

Which certificate ``cert`` prints: ``--dir`` when given; else that of the lab that is
up (``meta169 lab up`` makes each lab its own key; stderr names the lab); else the
default directory's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from meta169.errors import ConfigError
from meta169.exits import cli_errors
from meta169.identity.signer import (
    CERT_FILE,
    DEFAULT_ACCOUNT,
    KEY_FILE,
    KEY_SIZES,
    default_identity_dir,
    generate_identity_key,
    load_identity_certificate,
)
from meta169.identity.verify import MAX_INPUT, VerifyResult, verify_document
from meta169.lab.names import DEFAULT_STATE_ROOT

EXIT_VALID = 0
EXIT_INVALID = 1  # meta169.cli.EXIT_FINDINGS

_dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of identity-key.pem and identity-cert.pem "
    "[default: /var/lib/meta169/identity as root, else $XDG_DATA_HOME/meta169/identity].",
)


def _resolve(directory: Path | None) -> Path:
    if directory is not None:
        return directory
    return default_identity_dir(euid=os.geteuid(), home=Path.home(), xdg_data_home=os.environ.get("XDG_DATA_HOME"))


@click.group("identity")
def identity() -> None:
    """Sign and verify EC2 instance identity documents."""


@identity.command("init")
@_dir_option
@click.option("--account", default=DEFAULT_ACCOUNT, show_default=True, help="Account id named in the certificate.")
@click.option(
    "--bits", type=click.Choice([str(b) for b in KEY_SIZES]), default="2048", show_default=True, help="RSA key size."
)
def init(directory: Path | None, account: str, bits: str) -> None:
    """Make the signing key (mode 0600) and its self-signed certificate (10 years)."""
    with cli_errors():
        target = _resolve(directory)
        generate_identity_key(target, account_id=account, bits=int(bits))
    click.echo(f"wrote {target / KEY_FILE} (mode 0600) and {target / CERT_FILE}")
    click.echo(f"serve with --identity-key-dir {target}; publish: meta169 identity cert --dir {target}")


@identity.command("cert")
@_dir_option
@click.option("--lab", "lab_name", metavar="NAME", envvar="META169_LAB",
              help="With several labs up, the one whose certificate to print [env META169_LAB].")  # fmt: skip
@click.option("--state-root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_STATE_ROOT,
              show_default=True, help="Where labs keep their state (a lab's own directory works too).")  # fmt: skip
def cert(directory: Path | None, lab_name: str | None, state_root: Path) -> None:
    """Print the certificate (PEM) that guests and services verify documents with.

    Whose: --dir DIR when given; else the lab that is up (said on stderr); else the
    default directory's.
    """
    from cryptography.hazmat.primitives.serialization import Encoding

    with cli_errors():
        source, said = _cert_dir(directory, lab_name, state_root)
        certificate = load_identity_certificate(source)
    if said:
        click.echo(said, err=True)
    click.echo(certificate.public_bytes(Encoding.PEM).decode("ascii"), nl=False)


def _cert_dir(directory: Path | None, lab_name: str | None, state_root: Path) -> tuple[Path, str]:
    """The key directory ``cert`` reads, and what to say about it on stderr."""
    if directory is not None:
        return directory, ""
    from meta169.lab.plan import LabPaths
    from meta169.lab.state import labs_under

    states, _ = labs_under(state_root)
    up = [s for s in states if s.status == "up" and (lab_name is None or s.config.name == lab_name)]
    if lab_name is not None and not up:
        raise ConfigError(f"no lab {lab_name!r} is up under {state_root}")
    if len(up) > 1:
        names = ", ".join(s.config.name for s in up)
        raise ConfigError(f"several labs are up under {state_root} ({names}): choose one with --lab NAME, "
                          "or name a key directory with --dir DIR")  # fmt: skip
    if up:
        lab_dir = LabPaths(up[0].config.directory).identity_dir
        said = f"meta169 identity: the certificate of lab {up[0].config.name} ({lab_dir}); --dir DIR for another"
        return lab_dir, said
    return _resolve(None), ""


_input = click.Path(dir_okay=False, path_type=Path)


@identity.command("verify")
@click.option(
    "--cert",
    "cert_file",
    required=True,
    type=_input,
    help="The operator's certificate (PEM), as printed by meta169 identity cert.",
)
@click.option(
    "--document",
    "document_file",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="The document as served (FILE, or - for stdin) [default: the one the pkcs7 carries].",
)
@click.option("--signature", "signature_file", type=_input, help="dynamic/instance-identity/signature.")
@click.option(
    "--pkcs7",
    "pkcs7_file",
    type=_input,
    help="dynamic/instance-identity/pkcs7 (with or without BEGIN/END PKCS7 lines).",
)
@click.option("--rsa2048", "rsa2048_file", type=_input, help="dynamic/instance-identity/rsa2048.")
def verify(
    cert_file: Path,
    document_file: Path | None,
    signature_file: Path | None,
    pkcs7_file: Path | None,
    rsa2048_file: Path | None,
) -> None:
    """Check an instance identity document: exit 0 if valid, 1 if not."""
    with cli_errors():
        result = verify_document(
            None if document_file is None else _read(document_file, "--document"),
            _text(signature_file, "--signature"),
            _text(pkcs7_file, "--pkcs7"),
            _read(cert_file, "--cert"),
            rsa2048_b64=_text(rsa2048_file, "--rsa2048"),
        )
    click.echo(render_result(result))
    sys.exit(EXIT_VALID if result.valid else EXIT_INVALID)


def render_result(result: VerifyResult) -> str:
    """One line per check, then the verdict naming the instance."""
    lines = [f"{c.name}: {'OK' if c.ok else 'FAILED'}: {c.detail}" for c in result.checks]
    if not result.valid:
        lines.append("identity document NOT verified")
        return "\n".join(lines)
    origin = " (taken from the pkcs7)" if result.document_from_pkcs7 else ""
    facts = _document_facts(result.document)
    lines.append(f"identity document verified{origin}" + (f": {facts}" if facts else ""))
    return "\n".join(lines)


def _document_facts(document: bytes) -> str:
    try:
        parsed: Any = json.loads(document)
    except ValueError:
        return ""
    if not isinstance(parsed, dict):
        return ""
    keys = ("instanceId", "accountId", "region", "privateIp")
    return ", ".join(f"{k} {parsed[k]}" for k in keys if isinstance(parsed.get(k), str))


def _read(path: Path, flag: str) -> bytes:
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(MAX_INPUT + 1)
        else:
            with path.open("rb") as stream:
                data = stream.read(MAX_INPUT + 1)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror}") from exc
    if len(data) > MAX_INPUT:
        raise ConfigError(f"{flag} {path}: more than {MAX_INPUT} bytes; not an identity document")
    return data


def _text(path: Path | None, flag: str) -> str | None:
    if path is None:
        return None
    # Not ASCII cannot be base64; let the verifier report it as malformed.
    return _read(path, flag).decode("ascii", errors="replace")
