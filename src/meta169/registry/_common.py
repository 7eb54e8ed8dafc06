"""Rules every backend shares, so the memory and SQL backends behave the same."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable

from meta169.errors import ValidationError
from meta169.model import Instance
from meta169.registry.base import Changes

# How many revisions of the change log are kept. A reader further behind than this
# gets a full answer (every instance, topology changed) instead of an exact one.
DEFAULT_CHANGE_LOG_SIZE = 10_000


def stored_instance(instance: Instance) -> Instance:
    """The instance as a backend stores it: vendor data as JSON would return it.

    The SQL backends keep vendor data as JSON text; the memory backend stores this
    normalized copy so a read returns the same value from every backend. It also
    refuses vendor data JSON cannot carry, before anything is written.
    """
    if instance.vendor_data is None:
        # Frozen, and its mappings are its own copies: nothing to normalize. (A
        # replace would validate the whole instance again, a quarter of what an
        # import of 100,000 instances costs the registry.)
        return instance
    try:
        vendor_data = json.loads(json.dumps(instance.vendor_data))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"instance {instance.uuid}: vendor_data is not JSON: {exc}") from exc
    return dataclasses.replace(instance, vendor_data=vendor_data)


def beyond_horizon(since: int, current: int, log_size: int) -> bool:
    """True when the change log can no longer say exactly what changed after ``since``.

    Rows up to ``current - log_size`` are pruned; a revision from the future means the
    store was replaced (for example a fresh database), so nothing cached is valid.
    """
    return since > current or since < current - log_size


def full_changes(current: int, uuids: Iterable[str]) -> Changes:
    return Changes(revision=current, instances=frozenset(uuids), topology=True)
