#!/usr/bin/env bash
# Starts a worker with an embedded NATS server on a free port, runs
# `submit bench` with the given arguments against it, and stops the worker.
#   scripts/bench-worker.sh "WORKER FLAGS" BENCH ARGS...
# WORKER_BIN names another build's bin directory for the worker (make
# bench-compare runs an older commit's worker under this submit). With
# BENCH_CPU=1 the warm measurement reports CPU per run of each component
# (submit bench --cpu-worker-pid): the worker runs on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
WORKER_BIN=${WORKER_BIN:-$BIN}
worker_flags=$1
shift
port=4300
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
DATA=$(mktemp -d)
# shellcheck disable=SC2086
"$WORKER_BIN/worker" --id "bench-$$" --listen "127.0.0.1:$port" --data-dir "$DATA/nats" --log-level warn $worker_flags >"$DATA/log" 2>&1 &
WPID=$!
trap 'kill -TERM $WPID 2>/dev/null; wait $WPID 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 1 100); do
	"$BIN/submit" stats --nats "nats://127.0.0.1:$port" --wait 200ms 2>/dev/null | grep -q "bench-$$" && break
	sleep 0.2
done
cpu=()
if [ "${BENCH_CPU:-}" = 1 ]; then
	cpu=(--cpu-worker-pid "$WPID" --cpu-worker-id "bench-$$")
fi
"$BIN/submit" bench --nats "nats://127.0.0.1:$port" "${cpu[@]}" "$@"
