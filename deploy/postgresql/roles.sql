-- PostgreSQL roles for CarePost (docs/deployment.md, "PostgreSQL").
-- Run as a superuser once: psql -v app_password=... -v migrate_password=... -f roles.sql
--
-- carepost_owner   owns the schema; used only by `carepost init` (migrations) — carepost-migrate.service
-- carepost_app     what `serve`, `worker` and the listeners connect as: read and write rows, nothing else
--                  (no DDL, no TRUNCATE, no superuser, no replication, not the owner of any table);
--                  audit_events is append-only for it: `carepost init` takes UPDATE and TRUNCATE on
--                  it from every other role after each migration (carepost.core.migrate)
-- Proved by tests/test_postgres_roles.py (this file run as written, init as the owner, the work as the app).

CREATE ROLE carepost_owner LOGIN PASSWORD :'migrate_password';
CREATE ROLE carepost_app LOGIN PASSWORD :'app_password' NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
CREATE DATABASE carepost OWNER carepost_owner;
\connect carepost
REVOKE ALL ON DATABASE carepost FROM PUBLIC;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE carepost TO carepost_app;
GRANT USAGE ON SCHEMA public TO carepost_app;
-- Tables and sequences the owner creates now and in later migrations:
ALTER DEFAULT PRIVILEGES FOR ROLE carepost_owner IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO carepost_app;
ALTER DEFAULT PRIVILEGES FOR ROLE carepost_owner IN SCHEMA public
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO carepost_app;
-- After a restore (tables created by someone else), grant on what exists:
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO carepost_app;
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO carepost_app;
-- Each process holds up to CAREPOST_DATABASE_POOL_SIZE + CAREPOST_DATABASE_MAX_OVERFLOW connections:
ALTER ROLE carepost_app CONNECTION LIMIT 400;
