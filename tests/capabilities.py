"""The one rule for a test that lacks a capability: skip, or fail under META169_REQUIRE_E2E=1.

A capability is something the host may lack: root, network namespaces, dnsmasq,
dhclient, a PostgreSQL server, cloud-init, the compiled extension, a command-line
tool. Every such check calls :func:`require`, so CI (which sets
META169_REQUIRE_E2E=1) cannot pass by skipping. A skip that does not depend on the
host, such as a parametrised case that does not apply, is a plain ``pytest.skip``.
"""

from __future__ import annotations

import os
from typing import Literal, NoReturn, overload

import pytest

REQUIRE_ENV = "META169_REQUIRE_E2E"


@overload
def require(capability: str, ok: Literal[False], why: str) -> NoReturn: ...
@overload
def require(capability: str, ok: bool, why: str) -> None: ...
def require(capability: str, ok: bool, why: str) -> None:
    """Skip when a capability is missing; under META169_REQUIRE_E2E=1, fail instead."""
    if ok:
        return
    message = f"missing capability {capability}: {why}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1 turns this skip into a failure)", pytrace=False)
    pytest.skip(message)
