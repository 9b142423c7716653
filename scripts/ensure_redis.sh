#!/usr/bin/env bash
# Start a throw-away redis-server on 127.0.0.1:6379 when nothing answers there.
# Installs redis-server from Debian's packages on a machine that lacks it.
set -euo pipefail
PORT="${SPECRAG_REDIS_PORT:-6379}"
if (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null; then
  exit 0
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found; installing it from Debian's packages" >&2
  (apt-get update -qq && apt-get install -y -qq redis-server) >&2
fi
redis-server --daemonize yes --bind 127.0.0.1 --port "$PORT" --save "" --appendonly no >&2
for _ in $(seq 1 50); do
  (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && exit 0
  sleep 0.1
done
echo "redis-server did not start on port $PORT" >&2
exit 1
