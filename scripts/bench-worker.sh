#!/usr/bin/env bash
# Starts a worker with an embedded NATS server on a free port, runs
# `submit bench` with the given arguments against it, and stops the worker.
#   scripts/bench-worker.sh "WORKER FLAGS" BENCH ARGS...
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
worker_flags=$1
shift
port=4300
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
DATA=$(mktemp -d)
# shellcheck disable=SC2086
"$BIN/worker" --id "bench-$$" --listen "127.0.0.1:$port" --data-dir "$DATA/nats" --log-level warn $worker_flags >"$DATA/log" 2>&1 &
WPID=$!
trap 'kill -TERM $WPID 2>/dev/null; wait $WPID 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 1 100); do
	"$BIN/submit" stats --nats "nats://127.0.0.1:$port" --wait 200ms 2>/dev/null | grep -q "bench-$$" && break
	sleep 0.2
done
"$BIN/submit" bench --nats "nats://127.0.0.1:$port" "$@"
