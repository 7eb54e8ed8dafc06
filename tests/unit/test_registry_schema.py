"""The migration files and how they are split into statements."""

from __future__ import annotations

import pytest

from meta169.errors import SchemaError
from meta169.registry import schema
from meta169.registry.schema import load_migrations, split_statements


def test_registry_schema_split_statements_skips_comments_and_keeps_lines() -> None:
    sql = """
    -- a comment; with a semicolon
    CREATE TABLE a (
        x INTEGER -- trailing words
    );

    INSERT INTO a (x) VALUES (1);
    """
    assert split_statements(sql) == (
        "    CREATE TABLE a (\n        x INTEGER -- trailing words\n    )",
        "    INSERT INTO a (x) VALUES (1)",
    )


def test_registry_schema_unterminated_statement_is_an_error() -> None:
    with pytest.raises(SchemaError, match="inside a statement"):
        split_statements("CREATE TABLE a (x INTEGER);\nCREATE TABLE b (y INTEGER)\n")


def test_registry_schema_shipped_migrations_are_numbered_from_one() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "initial"
    assert all(m.statements for m in migrations)


def test_registry_schema_first_migration_builds_every_table() -> None:
    created = {
        statement.split()[2]
        for m in load_migrations()
        for statement in m.statements
        if statement.startswith("CREATE TABLE")
    }
    # schema_version is made by the runner itself, before any migration.
    assert created | {"schema_version"} == set(schema.metadata.tables)
