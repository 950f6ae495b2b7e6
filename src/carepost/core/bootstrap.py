"""First start: data dir, master key, database key, schema. Idempotent."""

from __future__ import annotations

import os
from dataclasses import dataclass

from carepost.core.config import Settings, get_settings
from carepost.core.crypto import (
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
    if settings.master_key is None and not settings.resolved_master_key_file.exists():
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
