#!/bin/sh
# Compose only (run once by the postgres image on an empty volume): creates the roles of
# roles.sql with the passwords from the secrets. Elsewhere run:
#   psql -v app_password=... -v migrate_password=... -f roles.sql
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v app_password="$(cut -d: -f5 /run/secrets/pgpass_app)" \
  -v migrate_password="$(cut -d: -f5 /run/secrets/pgpass_owner)" \
  -f /etc/carepost/roles.sql
