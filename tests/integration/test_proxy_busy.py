"""A request the upstream pool refuses at once (no connection allowed) is answered
503 through the same hand-over as a late reply, on both of the proxy's paths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meta169.http.listen import Binding
from meta169.proxy.upstream import Upstream, UpstreamSpec
from tests.integration.serving import get, proxy_in_process


@pytest.fixture
def busy_proxy(tmp_path: Path) -> Iterator[tuple[str, int]]:
    upstream = Upstream(UpstreamSpec(unix_path=tmp_path / "none.sock", max_connections=0))
    with proxy_in_process(upstream, Binding("network", "net-a")) as address:
        yield address


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/latest/meta-data/instance-id", {}),
        ("/latest/meta-data/instance%2Did", {}),  # percent-encoding: the compiled stamping steps aside
        ("/latest/meta-data/instance-id", {"Connection": "close"}),
    ],
    ids=["compiled", "python", "close"],
)
def test_proxy_busy_pool_is_503(busy_proxy: tuple[str, int], path: str, headers: dict[str, str]) -> None:
    status, _, body = get(busy_proxy, path, headers=headers)
    assert status == 503 and b"unavailable" in body
