#!/usr/bin/env bash
# Runs the whole test suite: unit, property and black-box tests against the real binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo nextest run --workspace --no-fail-fast "$@"
