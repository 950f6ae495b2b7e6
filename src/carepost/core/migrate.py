"""Run Alembic migrations programmatically (no alembic.ini to find).

Alembic is imported when a migration runs, not with this module: every process imports
:mod:`carepost.core.bootstrap` (through the tables), few of them migrate, and Alembic with Mako
costs about 0.1 s of start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(connection=None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


# Tables only ever appended to (and pruned by retention): on PostgreSQL no role but the one that
# migrates may UPDATE or TRUNCATE them, whatever roles.sql's default privileges granted when a
# migration created them (deploy/postgresql/roles.sql, docs/deployment.md "PostgreSQL").
APPEND_ONLY_TABLES = ("audit_events",)

_REVOKE_APPEND_ONLY = """
DO $$
DECLARE g record;
BEGIN
  FOR g IN SELECT DISTINCT c.relname AS table_name, pg_get_userbyid(a.grantee) AS grantee
           FROM pg_class c, aclexplode(c.relacl) a
           WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = ANY(:tables)
             AND a.privilege_type IN ('UPDATE', 'TRUNCATE') AND a.grantee <> c.relowner AND a.grantee <> 0 LOOP
    EXECUTE format('REVOKE UPDATE, TRUNCATE ON %I FROM %I', g.table_name, g.grantee);
  END LOOP;
END $$
"""


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)
        if connection.dialect.name == "postgresql":
            revoke_append_only(connection)


def revoke_append_only(connection) -> None:
    """After every migration, on PostgreSQL: the append-only tables lose UPDATE and TRUNCATE for
    every other role (the application role keeps SELECT, INSERT and DELETE: retention prunes).
    The hash chain of the audit log then cannot be rewritten in place by the role the servers
    and workers connect as. Nothing is granted here, only taken away."""
    from sqlalchemy import text

    statement = _REVOKE_APPEND_ONLY.replace(":tables", "ARRAY[" + ",".join(
        "'" + t + "'" for t in APPEND_ONLY_TABLES) + "]::text[]")
    connection.execute(text(statement))


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    # Only reads: DEFERRED on SQLite, so a caller holding the write lock (the evidence pack runs
    # the doctor inside its own transaction) is not waited on for the whole busy timeout.
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as connection:
        return MigrationContext.configure(connection).get_current_revision()
