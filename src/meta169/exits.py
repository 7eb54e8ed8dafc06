"""Exit codes of every ``meta169`` command, and the mapping of the error tree onto them.

Stable and documented in the README:

- 0  success
- 1  the command ran and found a problem (doctor findings of error severity)
- 2  usage or configuration error (bad flag, unreadable file, invalid inventory)
- 3  registry error (database unreachable, not found, conflict)
- 4  runtime error in the network path (plumbing, lab, proxy)
- 5  a source of instances (libvirt, OpenStack) cannot be reached or read

Low level: each subcommand's module uses it without importing the top-level CLI.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import click

from meta169.errors import (
    ConfigError,
    LabError,
    Meta169Error,
    NotFound,
    PlumbingError,
    ProxyError,
    RegistryError,
    SourceError,
    ValidationError,
)

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_REGISTRY = 3
EXIT_RUNTIME = 4
EXIT_SOURCE = 5


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"meta169: error: {message}", err=True)
    sys.exit(code)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Map the typed error tree to exit codes; the only broad catch is at the top."""
    try:
        yield
    except (ConfigError, ValidationError) as exc:
        fail(str(exc), EXIT_USAGE)
    except NotFound as exc:
        fail(str(exc), EXIT_REGISTRY)
    except RegistryError as exc:
        fail(f"registry: {exc}", EXIT_REGISTRY)
    except (PlumbingError, LabError, ProxyError) as exc:
        fail(str(exc), EXIT_RUNTIME)
    except SourceError as exc:
        fail(str(exc), EXIT_SOURCE)
    except Meta169Error as exc:
        fail(str(exc), EXIT_RUNTIME)
