#!/usr/bin/env bash
# Makes the virtualenv the gRPC tests drive the official RocketMQ 5 Python client from
# (rocketmq-python-client from PyPI, pinned), once; prints its python.
set -euo pipefail
venv="${TXMQ_GRPC_VENV:-/var/tmp/txmq-grpc-venv}"
version="5.1.2"
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('rocketmq-python-client') != '$version')" 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "rocketmq-python-client==$version" >&2
fi
echo "$venv/bin/python"
