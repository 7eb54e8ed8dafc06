"""MetadataClient over an in-memory service: IMDSv2 token handling (botocore's fallback rules),
retries and backoff, and error typing. The transport is the client's injected seam."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from meta169.client.client import TOKEN_HEADER, TTL_HEADER, ClientConfig, MetadataClient
from meta169.client.transport import Reply
from meta169.client.url import parse_url
from meta169.errors import ClientError, ConfigError

ENDPOINT = parse_url("http://127.0.0.1:8775")


@dataclass
class FakeService:
    """Answers like a metadata service; ``put_status`` decides the token endpoint's reply."""

    put_status: int | None = 200  # None: the PUT times out
    require_token: bool = False
    tokens_valid: bool = True
    failures: list[ClientError | int] = field(default_factory=list)  # served first, in order
    calls: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def __call__(self, method: str, path: str, headers: Mapping[str, str], *, body: bytes | None = None) -> Reply:
        self.calls.append((method, path, dict(headers)))
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, ClientError):
                raise failure
            return Reply(failure, b"oops")
        if path == "/latest/api/token":
            if self.put_status is None:
                raise ClientError("no reply", reason="read-timeout")
            if method != "PUT":
                return Reply(405)
            return Reply(self.put_status, b"TOKEN" if self.put_status == 200 else b"")
        token = headers.get(TOKEN_HEADER)
        if token is not None and not self.tokens_valid:
            self.tokens_valid = True  # the next token will be good
            return Reply(401)
        if self.require_token and token is None:
            return Reply(401)
        if path == "/latest/meta-data/instance-id":
            return Reply(200, b"i-1")
        return Reply(404, b"404 Not Found")


def _client(service: FakeService, **config: object) -> tuple[MetadataClient, list[float]]:
    slept: list[float] = []
    cfg = ClientConfig(**config)  # type: ignore[arg-type]
    return MetadataClient(ENDPOINT, cfg, transport=service, sleep=slept.append), slept


def test_client_imdsv2_auto_uses_the_token_when_offered() -> None:
    service = FakeService()
    client, _ = _client(service)
    assert client.fetch("/latest/meta-data/instance-id") == b"i-1"
    put, get = service.calls
    assert put[0:2] == ("PUT", "/latest/api/token") and put[2][TTL_HEADER] == "21600"
    assert get[2][TOKEN_HEADER] == "TOKEN"
    assert client.token_in_use


@pytest.mark.parametrize("status", [403, 404, 405])
def test_client_imdsv2_auto_falls_back_like_botocore(status: int) -> None:
    service = FakeService(put_status=status)
    client, _ = _client(service)
    assert client.fetch("/latest/meta-data/instance-id") == b"i-1"
    assert TOKEN_HEADER not in service.calls[-1][2]
    assert not client.token_in_use
    client.fetch("/latest/meta-data/instance-id")
    assert [c[0] for c in service.calls].count("PUT") == 1  # asked once, remembered


def test_client_imdsv2_auto_falls_back_on_a_put_read_timeout() -> None:
    client, _ = _client(FakeService(put_status=None))
    assert client.fetch("/latest/meta-data/instance-id") == b"i-1"


def test_client_imdsv2_400_is_fatal() -> None:
    client, _ = _client(FakeService(put_status=400))
    with pytest.raises(ClientError) as err:
        client.fetch("/latest/meta-data/instance-id")
    assert (err.value.reason, err.value.status) == ("status", 400)


def test_client_imdsv2_required_mode_refuses_to_fall_back() -> None:
    client, _ = _client(FakeService(put_status=404), imdsv2="required")
    with pytest.raises(ClientError, match="token request answered HTTP 404"):
        client.fetch("/latest/meta-data/instance-id")


def test_client_imdsv2_off_never_puts() -> None:
    service = FakeService(require_token=True)
    client, _ = _client(service, imdsv2="off")
    assert client.get("/latest/meta-data/instance-id").status == 401
    assert all(c[0] == "GET" for c in service.calls)


def test_client_imdsv2_expired_token_is_renewed_once() -> None:
    service = FakeService(tokens_valid=False)
    client, _ = _client(service)
    assert client.fetch("/latest/meta-data/instance-id") == b"i-1"
    assert [c[0] for c in service.calls] == ["PUT", "GET", "PUT", "GET"]


def test_client_retries_transport_failures_and_5xx_with_backoff() -> None:
    service = FakeService(failures=[ClientError("refused", reason="refused"), 503])
    client, slept = _client(service, imdsv2="off", retries=2, backoff=0.5)
    assert client.fetch("/latest/meta-data/instance-id") == b"i-1"
    assert slept == [0.5, 1.0]


def test_client_gives_up_after_the_configured_retries() -> None:
    service = FakeService(failures=[ClientError("t", reason="timeout")] * 3)
    client, slept = _client(service, imdsv2="off", retries=1)
    with pytest.raises(ClientError) as err:
        client.fetch("/")
    assert err.value.reason == "timeout"
    assert len(service.calls) == 2 and len(slept) == 1


def test_client_never_retries_a_4xx() -> None:
    service = FakeService()
    client, slept = _client(service, imdsv2="off", retries=3)
    with pytest.raises(ClientError) as err:
        client.fetch("/nope")
    assert err.value.status == 404
    assert len(service.calls) == 1 and slept == []


@pytest.mark.parametrize(
    "config", [{"timeout": 0}, {"retries": -1}, {"imdsv2": "maybe"}, {"token_ttl": 21601}, {"backoff": -1}]
)
def test_client_config_validates(config: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ClientConfig(**config)  # type: ignore[arg-type]
