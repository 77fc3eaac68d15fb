#!/usr/bin/env bash
# make demo: start one worker with an embedded NATS server, run the original
# isode README's two examples through `submit`, stop the worker, and check
# that no sandbox container is left behind.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-bin}
IMAGE=${ISODE_IMAGE:-isode-sandbox:latest}
ID="demo-$$"

port=4222
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
URL="nats://127.0.0.1:$port"
DATA=$(mktemp -d)
LOG="$DATA/worker.log"

cleanup() {
	if [[ -n "${WPID:-}" ]] && kill -0 "$WPID" 2>/dev/null; then
		kill -TERM "$WPID" 2>/dev/null || true
		wait "$WPID" 2>/dev/null || true
	fi
	rm -rf "$DATA"
}
trap cleanup EXIT

echo "==> starting a worker (embedded NATS on $URL, sandbox image $IMAGE)"
"$BIN/worker" --id "$ID" --listen "127.0.0.1:$port" --data-dir "$DATA/nats" \
	--image "$IMAGE" --low 2 --high 8 --log-format console >"$LOG" 2>&1 &
WPID=$!
for _ in $(seq 1 100); do
	grep -q "worker ready" "$LOG" && break
	if ! kill -0 "$WPID" 2>/dev/null; then
		cat "$LOG"
		echo "the worker exited before it was ready" >&2
		exit 1
	fi
	sleep 0.2
done
grep -q "worker ready" "$LOG" || { cat "$LOG"; echo "the worker did not become ready" >&2; exit 1; }

run() {
	local tenant=$1 code=$2
	echo
	echo "==> submit run --tenant $tenant '$code'"
	"$BIN/submit" run --nats "$URL" --tenant "$tenant" "$code"
}
run tenant1 'return function (cb) { cb(null, "Hello, world!"); }'
run tenant2 'return function (cb) { cb(null, process.versions); }'

echo
echo "==> submit stats"
"$BIN/submit" stats --nats "$URL"

echo
echo "==> stopping the worker (SIGTERM)"
kill -TERM "$WPID"
status=0
wait "$WPID" || status=$?
WPID=
echo "worker exited with status $status"
[[ $status -eq 0 ]] || { tail -n 20 "$LOG"; exit 1; }

left=$(docker ps -aq --filter "label=io.isode.worker=$ID")
if [[ -n "$left" ]]; then
	echo "containers left behind: $left" >&2
	exit 1
fi
echo "no sandbox container left behind"
