"""Which PostgreSQL driver errors end a session (registry/sql.py): pure, no server."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa

from meta169.registry.sql import _pg_session_ended

_DIALECT = sa.create_engine("postgresql+psycopg://meta169@localhost/meta169").dialect


@pytest.mark.parametrize(
    "error",
    [
        psycopg.OperationalError("connection socket closed"),
        psycopg.OperationalError("sending query failed: another command is already in progress"),
        psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
        psycopg.errors.CrashShutdown("terminating connection because of crash of another server process"),
        psycopg.errors.CannotConnectNow("the database system is shutting down"),
        psycopg.errors.ConnectionFailure("connection failure"),
    ],
    ids=lambda e: f"{type(e).__name__}: {e}",
)
def test_pg_session_ended_for_socket_and_shutdown_errors(error: Exception) -> None:
    assert _pg_session_ended(_DIALECT, error)


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
        psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"),
        psycopg.errors.UniqueViolation("duplicate key value"),
        psycopg.errors.SerializationFailure("could not serialize access"),
        psycopg.ProgrammingError("syntax error"),
        ValueError("not a driver error"),
    ],
    ids=lambda e: f"{type(e).__name__}: {e}",
)
def test_pg_session_ended_not_for_errors_on_a_working_session(error: Exception) -> None:
    assert not _pg_session_ended(_DIALECT, error)
