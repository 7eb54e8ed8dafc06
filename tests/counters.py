"""Numbers tests want in the run's output (fuzz cases run, hostile cases); printed by
``pytest_terminal_summary`` in tests/conftest.py even under ``-q``."""

from __future__ import annotations

SUMMARY: dict[str, str] = {}
