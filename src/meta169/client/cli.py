"""``meta169 query``: ask the metadata service from a guest (or a test) and print the answer.

Exit codes follow :mod:`meta169.cli`: 0 answered; 1 the service answered with an
HTTP error (404, 401, ...); 2 usage (bad URL or flag); 4 no answer at all
(refused, timed out, unreachable).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from meta169.client.client import ClientConfig, IMDSv2Mode, MetadataClient
from meta169.client.tree import leaf_to_json, tree_to_json
from meta169.client.url import DEFAULT_URL, parse_url
from meta169.errors import ClientError
from meta169.exits import EXIT_FINDINGS, EXIT_RUNTIME, cli_errors, fail


@contextmanager
def _errors() -> Iterator[None]:
    with cli_errors():
        try:
            yield
        except ClientError as exc:
            fail(str(exc), EXIT_FINDINGS if exc.reason == "status" else EXIT_RUNTIME)


def _mode(imdsv2: bool | None) -> IMDSv2Mode:
    if imdsv2 is None:
        return "auto"
    return "required" if imdsv2 else "off"


@click.command("query")
@click.argument("path", default="/", required=False)
@click.option(
    "--url",
    default=DEFAULT_URL,
    show_default=True,
    envvar="META169_URL",
    help="Metadata service base URL; IPv6 with a zone: 'http://[fe80::a9fe:a9fe%eth0]/' [env META169_URL].",
)
@click.option(
    "--imdsv2/--no-imdsv2",
    "imdsv2",
    default=None,
    help="Require an IMDSv2 token, or never ask for one [default: try the token PUT and fall back "
    "to plain GETs on 403/404/405, as botocore does].",
)
@click.option("-r", "--recursive", is_flag=True, help="Crawl the directory PATH and print every leaf.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a crawl as a nested object).")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds per attempt (connect and reply).")
@click.option("--retries", default=2, show_default=True, help="Extra attempts after a failure or a 5xx.")
def query(
    path: str, url: str, imdsv2: bool | None, recursive: bool, as_json: bool, timeout: float, retries: int
) -> None:
    """Fetch PATH (default /) from the metadata service: EC2 (/latest/meta-data/...) or
    OpenStack (/openstack/latest/meta_data.json) trees."""
    with _errors():
        endpoint = parse_url(url)
        client = MetadataClient(endpoint, ClientConfig(imdsv2=_mode(imdsv2), timeout=timeout, retries=retries))
        if recursive:
            result = client.crawl(path)
            if as_json:
                doc: dict[str, Any] = {
                    "url": endpoint.url(result.root),
                    "imdsv2": client.token_in_use,
                    "data": tree_to_json(result.tree),
                }
                click.echo(json.dumps(doc, indent=2, sort_keys=False))
                return
            for leaf_path, value in result.leaves:
                click.echo(_render_leaf(leaf_path, value))
            return
        body = client.fetch(path)
        if as_json:
            name = path.rstrip("/").rsplit("/", 1)[-1]
            doc = {"url": endpoint.url(path), "imdsv2": client.token_in_use, "data": leaf_to_json(name, body)}
            click.echo(json.dumps(doc, indent=2))
            return
        _write_body(body)


def _render_leaf(path: str, value: bytes | None) -> str:
    if value is None:
        return f"{path}: (listed, but 404)"
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return f"{path}: ({len(value)} bytes of binary data)"
    lines = text.splitlines() or [""]
    if len(lines) == 1:
        return f"{path}: {lines[0]}"
    return f"{path}:\n" + "\n".join("    " + line for line in lines)


def _write_body(body: bytes) -> None:
    out = sys.stdout.buffer
    out.write(body)
    if body and not body.endswith(b"\n") and sys.stdout.isatty():
        out.write(b"\n")
    out.flush()
