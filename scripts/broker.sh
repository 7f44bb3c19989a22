#!/usr/bin/env bash
# Builds what is needed and starts the broker on 127.0.0.1:9876 (gRPC endpoint on
# 127.0.0.1:8081, RocketMQ Remoting face on 127.0.0.1:10911) with ./txmq-data.
# Extra arguments go to txmq-broker (see `txmq-broker --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo run --release --bin txmq-broker -- "$@"
