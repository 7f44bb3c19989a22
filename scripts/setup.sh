#!/usr/bin/env bash
# Installs the system packages a fresh machine lacks for building txmq:
# libclang (bindgen in the rocksdb crate) and a C++ compiler (RocksDB itself); and for
# the tests, iproute2 (network namespaces for the broker group's partition test) and
# PostgreSQL (txmq-sql's tests start their own server on a temporary directory).
set -euo pipefail
need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup: installing cargo-nextest" >&2
    cargo install cargo-nextest --locked
fi
# The Remoting face's tests run the official RocketMQ Java client (tests/java, a Maven
# project): a JDK and Maven, and its dependencies resolved here once, so the tests run
# Maven offline.
if ! command -v mvn >/dev/null 2>&1 || ! command -v java >/dev/null 2>&1; then
    echo "setup: installing maven and a JDK" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq maven openjdk-17-jdk-headless >/dev/null
fi
echo "setup: resolving tests/java (RocketMQ Java client)" >&2
java_build="$(mktemp -d)"
mvn -B -q -f tests/java/pom.xml -Dtxmq.build="$java_build" -Dtest=NoSuchTest \
    -Dsurefire.failIfNoSpecifiedTests=false test \
    dependency:build-classpath -Dmdep.outputFile="$java_build/classpath" >&2
mvn -B -q -f tests/java/pom.xml -Dtxmq.build="$java_build/49" -P client49 -Dtest=NoSuchTest \
    -Dsurefire.failIfNoSpecifiedTests=false test >&2
echo "setup: resolving tests/java-grpc (RocketMQ 5 gRPC Java client)" >&2
mvn -B -q -f tests/java-grpc/pom.xml -Dtxmq.build="$java_build/grpc" -Dtest=NoSuchTest \
    -Dsurefire.failIfNoSpecifiedTests=false test >&2
echo "setup: resolving tests/spring (a Spring Boot service with rocketmq-spring-boot-starter)" >&2
mvn -B -q -f tests/spring/pom.xml -Dtxmq.build="$java_build/spring" -Dtest=OrderTest test >&2
rm -rf "$java_build"
# The Go clients' tests (tests/go: the Remoting client v2 and the 5.x gRPC client):
# their modules, downloaded once; the tests build offline.
if ! command -v go >/dev/null 2>&1; then
    echo "setup: installing Go" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq golang-go >/dev/null
fi
echo "setup: downloading tests/go's modules (RocketMQ Go clients)" >&2
(cd tests/go && go mod download && go vet ./... >&2)
