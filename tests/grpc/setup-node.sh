#!/usr/bin/env bash
# Installs the official RocketMQ 5 Node.js client (rocketmq-client-nodejs from npm,
# pinned) once, for the gRPC tests; prints its node_modules directory.
set -euo pipefail
dir="${TXMQ_NODE_DIR:-/var/tmp/txmq-node}"
version="1.0.8"
if ! grep -qs "\"version\": \"$version\"" "$dir/node_modules/rocketmq-client-nodejs/package.json"; then
  mkdir -p "$dir"
  (cd "$dir" && { [ -f package.json ] || npm init -y >/dev/null; } \
    && npm install --silent --no-audit --no-fund "rocketmq-client-nodejs@$version" >&2)
fi
echo "$dir/node_modules"
