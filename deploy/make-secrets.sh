#!/bin/sh
# Makes deploy/secrets/ for compose.yaml: the master key, database passwords, a private CA with
# certificates for PostgreSQL and the MLLP listener. For trying the topology; in production the
# master key comes from your key store (CAREPOST_MASTER_KEY_COMMAND) and certificates from your CA.
set -eu
cd "$(dirname "$0")"
mkdir -p secrets && chmod 700 secrets && cd secrets
umask 077
python3 - <<'PY'
import base64, secrets
open("master.key", "w").write(f"mk-{secrets.token_hex(10)}:{base64.b64encode(secrets.token_bytes(32)).decode()}\n")
PY
pw() { openssl rand -hex 24; }
pw > pg_superuser
echo "postgres:5432:carepost:carepost_app:$(pw)" > pgpass_app
echo "postgres:5432:carepost:carepost_owner:$(pw)" > pgpass_owner
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 -subj "/CN=CarePost deployment CA" \
  -keyout ca.key -out db-ca.pem 2>/dev/null
for host in db:postgres mllp:mllp; do
  name=${host%%:*}; dns=${host#*:}
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$dns" -keyout "$name.key" -out "$name.csr" 2>/dev/null
  printf "subjectAltName=DNS:%s\n" "$dns" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA db-ca.pem -CAkey ca.key -CAcreateserial -days 825 -extfile "$name.ext" -out "$name.pem" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
done
echo "secrets written to $(pwd)"
