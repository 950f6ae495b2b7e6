"""Alembic environment: the same keyed engine CarePost uses, batch mode on SQLite."""

from __future__ import annotations

from alembic import context

from carepost.core.database import Base, make_engine
from carepost.models import load_all_models

load_all_models()
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connectable = context.config.attributes.get("connection")
    if connectable is not None:
        _run(connectable)
        return
    engine = make_engine()
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("CarePost migrations run online only (the SQLite file is encrypted).")
run_migrations_online()
