#!/bin/sh
# The plaintext ceiling of this machine: Postfix's smtp-source against smtp-sink, to put
# CarePost's delivery figures (bench/delivery_throughput.py) in context.
#
#   bench/postfix_ceiling.sh [messages] [parallel sessions]
#
# Uses the binaries from the Debian postfix package, extracted into a temporary directory
# (apt-get download + dpkg -x): nothing is installed and no mail system is started.
set -eu
MESSAGES=${1:-50000}
SESSIONS=${2:-32}
PORT=${PORT:-2599}
WORK=$(mktemp -d)
trap 'kill "$SINK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
cd "$WORK"
if command -v smtp-source >/dev/null 2>&1; then
    SOURCE=$(command -v smtp-source); SINKBIN=$(command -v smtp-sink)
else
    apt-get download postfix >/dev/null 2>&1
    dpkg -x postfix_*.deb root
    export LD_LIBRARY_PATH="$WORK/root/usr/lib/postfix"
    SOURCE=root/usr/sbin/smtp-source; SINKBIN=root/usr/sbin/smtp-sink
fi
"$SINKBIN" -u nobody 127.0.0.1:$PORT 256 >/dev/null 2>&1 &
SINK=$!
sleep 1
START=$(date +%s.%N)
# 3 kB messages (about the size of the benchmark's), connections kept open between messages (-d).
"$SOURCE" -d -s "$SESSIONS" -l 3000 -m "$MESSAGES" -f sender@bar.example -t rcpt@sink.test 127.0.0.1:$PORT
END=$(date +%s.%N)
python3 -c "import sys; m=$MESSAGES; s=$END-$START; print(f'{{\"tool\": \"postfix smtp-source -> smtp-sink (plaintext)\", \"messages\": {m}, \"sessions\": $SESSIONS, \"seconds\": {s:.2f}, \"messages_per_second\": {m/s:.0f}}}')"
