"""serve's configuration: one frozen object built at the edge (flags, env, files).

Nothing below the CLI reads environment variables or global state; ``serve`` gets
this object and passes down what each part needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meta169.api.ratelimit import RateLimit
from meta169.api.tokens import KeyRing
from meta169.api.vendordata import DynamicTarget
from meta169.http.limits import Limits
from meta169.http.listen import ListenAddress, ListenerSpec
from meta169.model import MetadataOptions


@dataclass(frozen=True, slots=True)
class ServeConfig:
    # May carry a password joined from a 0600 file: never in repr or logs.
    registry_url: str = field(repr=False)
    listeners: tuple[ListenerSpec, ...]
    limits: Limits = field(default_factory=Limits)
    static_vendor_data: dict[str, Any] = field(default_factory=dict)
    account_id: str = "000000000000"
    # How often serve asks the registry whether anything changed; an import in
    # another process shows within this interval (plus one query).
    poll_interval: float = 0.5
    # PostgreSQL: learn of each write as it commits (LISTEN/NOTIFY), polling only as
    # a safety net. Off for a pooler that does not pass notifications on.
    registry_listen: bool = True
    # Rendered sites kept in memory (the oldest go first), and whether sites are
    # rendered ahead, at start and for every instance a change brings.
    site_cache_size: int = 4_000
    prerender: bool = True
    # Shared with meta169 proxy for TCP proxy listeners (per-request HMAC). Never
    # printed: repr=False keeps it out of logs and tracebacks.
    proxy_secret: bytes | None = field(default=None, repr=False)
    # IMDSv2 token keys; None: one random key made before workers fork.
    token_keys: KeyRing | None = field(default=None, repr=False)
    default_metadata_options: MetadataOptions = field(default_factory=MetadataOptions)
    # Per-instance request rate; None disables it (benchmarks only).
    rate_limit: RateLimit | None = field(default_factory=RateLimit)
    # Shared with a stock Neutron metadata agent (metadata_proxy_shared_secret).
    neutron_secret: bytes | None = field(default=None, repr=False)
    # identity-key.pem (mode 0600) and identity-cert.pem; None: identity documents
    # are served unsigned (meta169.identity).
    identity_key_dir: Path | None = None
    # vendor_data2.json's dynamic parts (Nova's vendordata_dynamic_targets).
    vendordata_targets: tuple[DynamicTarget, ...] = ()
    vendordata_timeout: float = 2.0
    # Start on a registry without instances (a fresh deployment waiting for its
    # first import) instead of refusing: every guest would get 404.
    allow_empty: bool = False
    # Seconds a stop (SIGTERM) waits for requests in flight before closing them.
    drain_timeout: float = 10.0
    # The root logger's level; None: as the edge set it. A reload applies a change.
    log_level: int | None = None
    # /metrics, /healthz and /readyz on a listener of their own; None: off.
    metrics_listen: ListenAddress | None = None
    # The share of requests written to the access log (0..1); None: no access log.
    access_log_sample: float | None = None
