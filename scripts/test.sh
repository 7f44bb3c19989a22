#!/usr/bin/env bash
# Runs the whole test suite: unit, property and black-box tests against the real binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
status=0
cargo nextest run --workspace --no-fail-fast "$@" || status=$?
# The public docs build without warnings (missing docs, broken links).
echo "test.sh: cargo doc (warnings are errors)" >&2
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --quiet || status=1
exit "$status"
