"""Request path normalization and the password path rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meta169.render import is_password_path, normalize_path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("", "/"),
        ("/", "/"),
        ("/latest", "/latest"),
        ("/latest/", "/latest"),
        ("/latest/meta-data/", "/latest/meta-data"),
        ("/latest/meta-data", "/latest/meta-data"),
        ("latest/meta-data", "/latest/meta-data"),
        ("/openstack", "/openstack"),
        ("/openstack/", "/openstack"),
        (
            "/latest/meta-data/network/interfaces/macs/fa:16:3e:00:00:05/",
            "/latest/meta-data/network/interfaces/macs/fa:16:3e:00:00:05",
        ),
        ("//", None),
        ("///", None),
        ("//latest", None),
        ("/latest//meta-data", None),
        ("/latest/meta-data//", None),
        ("/latest/../openstack", None),
        ("/..", None),
        ("/latest/meta-data/..", None),
        ("/latest/./meta-data", None),
        ("/latest/..foo", "/latest/..foo"),
        ("/a.b/c", "/a.b/c"),
    ],
)
def test_paths_normalize(path: str, expected: str | None) -> None:
    assert normalize_path(path) == expected


@given(st.text(alphabet="/.ab", max_size=12))
def test_paths_normalize_is_idempotent_and_canonical(path: str) -> None:
    canonical = normalize_path(path)
    if canonical is None:
        return
    assert canonical.startswith("/")
    assert canonical == "/" or not canonical.endswith("/")
    assert "//" not in canonical
    assert normalize_path(canonical) == canonical


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/openstack/latest/password", True),
        ("/openstack/latest/password/", True),
        ("/openstack/2013-04-04/password", True),
        ("/openstack/2020-10-14/password", True),
        ("openstack/2013-04-04/password", True),
        ("/openstack/2012-08-10/password", False),  # before GRIZZLY
        ("/openstack/2099-01-01/password", False),
        ("/openstack/latest/password/x", False),
        ("/openstack/latest", False),
        ("/latest/password", False),
        ("/openstack//password", False),
        ("/openstack/latest/../latest/password", False),
        ("/openstack/latest/meta_data.json", False),
    ],
)
def test_paths_is_password_path(path: str, expected: bool) -> None:
    assert is_password_path(path) is expected
