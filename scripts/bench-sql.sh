#!/bin/bash
# The cost of txmq-sql's helpers (issue 18): a PostgreSQL server and a release broker on
# temporary directories, then txmq-sql-demo's bench-txn and bench-outbox. Build first:
#   cargo build --release -p txmq-broker -p txmq-sql
set -e
B="${CARGO_TARGET_DIR:-$(dirname "$0")/../target}/release"
id -u txmq-pg >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin txmq-pg
T=$(mktemp -d); chmod 755 $T; mkdir $T/pg; chown txmq-pg $T/pg
PGB=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
runuser -u txmq-pg -- $PGB/initdb -D $T/pg -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
runuser -u txmq-pg -- $PGB/pg_ctl -D $T/pg -l $T/pg/log -o "-p 25432 -k $T/pg -c listen_addresses=127.0.0.1" -w start >/dev/null
$B/txmq-broker --listen 127.0.0.1:29876 --data-dir $T/broker --grpc-listen none --remoting-listen none 2>$T/broker.log &
BP=$!
sleep 1
URL="host=127.0.0.1 port=25432 user=postgres dbname=postgres"
for c in 1 8; do $B/txmq-sql-demo bench-txn --db "$URL" --broker 127.0.0.1:29876 --count 4000 --concurrency $c 2>/dev/null; done
$B/txmq-sql-demo bench-txn --db "sqlite:$T/lite.db" --broker 127.0.0.1:29876 --count 4000 --concurrency 1 2>/dev/null
$B/txmq-sql-demo bench-outbox --db "$URL" --broker 127.0.0.1:29876 --count 20000 --batch 100 2>/dev/null
$B/txmq-sql-demo bench-outbox --db "sqlite:$T/lite2.db" --broker 127.0.0.1:29876 --count 20000 --batch 100 2>/dev/null
kill $BP; wait $BP || true
runuser -u txmq-pg -- $PGB/pg_ctl -D $T/pg -m immediate -w stop >/dev/null
rm -rf $T
