"""pytest fixtures for the cloud-init harness; register with
``pytest_plugins = ["tests.harness.fixtures"]`` in the top-level conftest."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.cloudinit import cloudinit_path


@pytest.fixture(scope="session")
def cloudinit_pkg() -> Path:
    """dist-packages dir of the unpacked cloud-init 22.4.2 (skips when unavailable)."""
    return cloudinit_path()
