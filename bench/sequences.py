"""cloud-init 22.4.2's recorded request sequences: the fixture's format, the instance
shape they were recorded against, and what a replaying guest sends and accepts.

``bench/cloudinit_sequences.json`` is written by
``tests/integration/test_storm_sequence.py`` from cloud-init's own datasource code
(``bench/cloudinit_record.py``) talking to ``meta169 serve`` through a loopback relay
that logs every request on the wire, and is checked against a fresh recording every
time that test runs. The storm (``bench/storm.py``) replays it; nothing here does IO
but ``load``.

A sequence is what one datasource sends, in order, for one instance shaped like
``instance_document`` (one SSH key, user data, vendor data, one port): each request
is a new TCP connection (cloud-init's ``url_helper.readurl`` opens a fresh
``requests.Session`` per call and closes it afterwards), with the exact header lines
and the status meta169 answered. Per request the fixture also holds the retry policy
cloud-init applied to it, read from the arguments of ``readurl`` and ``wait_for_url``
at the call:

- ``timeout``: the ``requests`` timeout in seconds (``null``: none, the call waits
  for as long as it takes; ``DataSourceEc2.get_metadata_api_version`` passes none);
- ``tries``: ``readurl``'s ``retries + 1``; ``sleep``: seconds between tries
  (``sec_between``);
- ``retry_on``: which failures are retried: ``"any"`` (an error status or a
  transport error), ``"transport"`` (only no reply or a timeout: an HTTP error status
  is final), ``"any-but-404"``;
- ``max_wait``: set when the request is ``wait_for_url``'s probe: ``<= 0`` means one
  try, else it is retried until that many seconds have passed, sleeping
  ``loop // 5 + 1`` seconds between rounds; the probe needs a non-empty 2xx body.

Placeholders: ``{host}`` (the Host header: 169.254.169.254 for a guest), ``{token}``
(the IMDSv2 token the sequence's PUT returned), ``{mac}`` (the instance's MAC, in
EC2 interface paths).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

FIXTURE = Path(__file__).resolve().with_name("cloudinit_sequences.json")
CLOUDINIT_VERSION = "22.4.2"
FORMAT = 1
# The datasources a guest can run. "ec2" is IMDSv1 (any non-AWS platform),
# "ec2-imdsv2" is DataSourceEc2 on the AWS platform, the only one on which 22.4.2
# asks for a token (DataSourceEc2._maybe_fetch_api_token).
KINDS = ("openstack", "ec2", "ec2-imdsv2")
RetryOn = Literal["any", "transport", "any-but-404"]
RETRY_ON: tuple[RetryOn, ...] = ("any", "transport", "any-but-404")
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
METADATA_HOST = "169.254.169.254"

# The instance every sequence was recorded against; the storm's guests are all of
# this shape (a different key count or a second port would change the EC2 crawl).
RECORD_MAC = "fa:16:3e:5f:00:01"
RECORD_UUID = "5707a000-0000-4000-8000-000000000001"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIStormKeyOnlyNotARealKey storm@meta169"


def instance_document(uuid: str, name: str, network: str, ip: str, mac: str, project: str) -> dict[str, Any]:
    """One instance in the inventory format: the shape the sequences were recorded with."""
    return {
        "uuid": uuid,
        "name": name,
        "hostname": name,
        "project_id": project,
        "availability_zone": "nova",
        "instance_type": "m1.small",
        "image_id": "img-debian-12",
        "metadata": {"role": "storm"},
        "keys": [{"name": "storm", "type": "ssh", "data": SSH_KEY}],
        "user_data": f"#cloud-config\nhostname: {name}\n",
        "vendor_data": {"cloud-init": "#cloud-config\npackages: [htop]\n"},
        "ports": [{"network": network, "mac": mac, "ips": [ip]}],
    }


def network_document(network: str, project: str, cidr: str, gateway: str) -> dict[str, Any]:
    return {
        "id": network,
        "project_id": project,
        "name": network,
        "subnets": [{"cidr": cidr, "gateway": gateway, "dhcp": True, "dns": [gateway]}],
    }


def recording_inventory(network: str = "rec-net") -> dict[str, Any]:
    """The inventory a recording runs against: one instance on 127.0.0.1."""
    return {
        "networks": [network_document(network, "rec", "127.0.0.0/24", "127.0.0.254")],
        "instances": [instance_document(RECORD_UUID, "rec-1", network, "127.0.0.1", RECORD_MAC, "rec")],
    }


@dataclass(frozen=True)
class Step:
    """One request of a sequence, as recorded."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    status: int
    timeout: float | None
    tries: int
    sleep: float
    retry_on: RetryOn
    max_wait: float | None
    site: str

    def __post_init__(self) -> None:
        if self.method not in ("GET", "PUT"):
            raise ValueError(f"unexpected method {self.method!r}")
        if not self.path.startswith("/"):
            raise ValueError(f"path {self.path!r} must start with /")
        if self.retry_on not in RETRY_ON:
            raise ValueError(f"retry_on {self.retry_on!r} not one of {RETRY_ON}")
        if self.tries < 1:
            raise ValueError("tries must be >= 1")

    @property
    def uses_token(self) -> bool:
        return any(name.lower() == TOKEN_HEADER.lower() for name, _ in self.headers)

    @property
    def is_token_put(self) -> bool:
        return self.method == "PUT"

    @property
    def probe(self) -> bool:
        """``wait_for_url``'s request: any non-empty 2xx is success."""
        return self.max_wait is not None

    def path_for(self, mac: str) -> str:
        return self.path.replace("{mac}", mac)

    def request(self, *, mac: str, token: str = "", host: str = METADATA_HOST) -> bytes:
        """The request bytes a guest with ``mac`` sends (``token`` from its PUT)."""
        lines = [f"{self.method} {self.path_for(mac)} HTTP/1.1"]
        for name, value in self.headers:
            lines.append(f"{name}: {value.replace('{host}', host).replace('{token}', token)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def retried(self, status: int | None) -> bool:
        """Whether cloud-init tries again after this outcome (None: no reply, a timeout)."""
        if status is None:
            return True
        if self.retry_on == "transport":
            return False
        return not (self.retry_on == "any-but-404" and status == 404)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "headers": [list(h) for h in self.headers],
            "status": self.status,
            "timeout": self.timeout,
            "tries": self.tries,
            "sleep": self.sleep,
            "retry_on": self.retry_on,
            "max_wait": self.max_wait,
            "site": self.site,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Step:
        return cls(
            method=str(obj["method"]),
            path=str(obj["path"]),
            headers=tuple((str(n), str(v)) for n, v in obj["headers"]),
            status=int(obj["status"]),
            timeout=None if obj["timeout"] is None else float(obj["timeout"]),
            tries=int(obj["tries"]),
            sleep=float(obj["sleep"]),
            retry_on=obj["retry_on"],
            max_wait=None if obj["max_wait"] is None else float(obj["max_wait"]),
            site=str(obj["site"]),
        )


@dataclass(frozen=True)
class Recording:
    """Every kind's sequence, and what the recording ran with."""

    sequences: Mapping[str, tuple[Step, ...]]
    environment: Mapping[str, str]

    def __post_init__(self) -> None:
        for kind, steps in self.sequences.items():
            if kind not in KINDS:
                raise ValueError(f"unknown datasource kind {kind!r}")
            if not steps:
                raise ValueError(f"{kind}: empty sequence")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "cloud_init": CLOUDINIT_VERSION,
            "environment": dict(self.environment),
            "instance": {"uuid": RECORD_UUID, "mac": RECORD_MAC},
            "sequences": {k: [s.to_json() for s in v] for k, v in self.sequences.items()},
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Recording:
        if obj.get("format") != FORMAT or obj.get("cloud_init") != CLOUDINIT_VERSION:
            raise ValueError(f"not a format-{FORMAT} recording of cloud-init {CLOUDINIT_VERSION}")
        return cls(
            sequences={k: tuple(Step.from_json(s) for s in v) for k, v in obj["sequences"].items()},
            environment={str(k): str(v) for k, v in obj.get("environment", {}).items()},
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1) + "\n"


def load(path: Path = FIXTURE) -> Recording:
    return Recording.from_json(json.loads(path.read_text()))


def signature(steps: Sequence[Step]) -> list[tuple[str, str, bool, int]]:
    """What a request log must match: method, path, token sent, status, in order."""
    return [(s.method, s.path, s.uses_token, s.status) for s in steps]
