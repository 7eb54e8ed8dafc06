"""Reading a secret (a shared key, a password, a token) from a file only its owner can read.

Low level on purpose: the identity signer, the token ring, serve, the proxy and the
admin API all read secrets, and none of them should import another to do it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from meta169.errors import ConfigError


def read_secret_file(path: Path, *, what: str) -> bytes:
    """Read a secret from a file that only its owner can read.

    Secrets never come from argv (visible in ``ps``) or the environment (visible in
    /proc/PID/environ to the same user and often logged by supervisors).
    """
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{what}: {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); run: chmod 600 {path}"
        )
    if hasattr(os, "getuid") and st.st_uid not in (os.getuid(), 0):
        raise ConfigError(f"{what}: {path} is owned by uid {st.st_uid}, not by this user or root")
    secret = data.strip()
    if len(secret) < 16:
        raise ConfigError(f"{what}: {path} holds {len(secret)} bytes; use at least 16 random bytes")
    return secret
