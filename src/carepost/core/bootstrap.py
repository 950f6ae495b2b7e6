"""First start: data dir, master key, database key, schema. Idempotent."""

from __future__ import annotations

import os
from dataclasses import dataclass

from carepost.core.config import Settings, get_settings
from carepost.core.crypto import (
    KeyUnavailable,
    create_database_secret,
    database_key_file,
    generate_master_key,
    get_keyring,
    load_master_keys,
    write_master_key_file,
)
from carepost.core.database import get_engine, system_session
from carepost.core.migrate import upgrade

SYSTEM_KEY_OWNER = "system"  # org_keys owner for secrets that belong to no organization (TOTP seeds)


@dataclass
class InitResult:
    created_master_key: bool
    created_database_key: bool


def initialize_storage(settings: Settings | None = None) -> InitResult:
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)
    created_master = False
    if not settings.master_key_external and not settings.resolved_master_key_file.exists():
        refuse_new_master_key_over_existing_data(settings)
        write_master_key_file(settings.resolved_master_key_file, generate_master_key())
        created_master = True
    created_db_key = False
    if settings.is_sqlite and not database_key_file(settings).exists():
        current, masters = load_master_keys(settings)
        create_database_secret(settings, masters, current)
        created_db_key = True
    upgrade(get_engine())
    with system_session() as session:
        get_keyring().ensure_org_keys(session, SYSTEM_KEY_OWNER)
        session.commit()
    return InitResult(created_master, created_db_key)


def existing_data(settings: Settings) -> str | None:
    """What already holds data encrypted under some master key, or None on a first start."""
    if settings.is_sqlite:
        for path in (settings.sqlite_path, database_key_file(settings)):
            if path.exists():
                return str(path)
        return None
    from sqlalchemy import inspect, text

    from carepost.core.database import make_engine

    engine = make_engine(settings)  # PostgreSQL opens without the master key
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("org_keys"):
                return None
            if conn.execute(text("SELECT 1 FROM org_keys LIMIT 1")).first() is None:
                return None
    finally:
        engine.dispose()
    return "the PostgreSQL database (its org_keys table holds wrapped keys)"


def refuse_new_master_key_over_existing_data(settings: Settings) -> None:
    """A new master key over existing data would make every key in it unreadable: refuse."""
    found = existing_data(settings)
    if found:
        raise KeyUnavailable(
            f"No master key at {settings.resolved_master_key_file}, but {found} already exists: refusing to create a "
            "new master key (nothing in the existing data would decrypt). Restore the master key file, or point "
            "CAREPOST_MASTER_KEY_FILE, CAREPOST_MASTER_KEY or CAREPOST_MASTER_KEY_COMMAND at it."
        )
