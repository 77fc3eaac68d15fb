#!/usr/bin/env bash
# The compose deployment end to end: build the images, bring up NATS and the
# workers with Docker Compose (v2 or v1), run the original isode README's two
# examples through `submit` as each of the two example applications (app-a,
# app-b: NATS accounts of their own), check that their equal isolate keys
# are two tenants, `submit stats` as the ops user, check an application is
# refused the stats, tear everything
# down and check nothing is left: no container, network or volume of the
# project, and no sandbox of its workers.
#
#   scripts/compose-demo.sh          (make compose-demo)
#
# Environment: ISODE_COMPOSE_PROJECT (default: isodedemo<pid>), WORKERS (3),
# ISODE_NATS_PORT (default: a free port), ISODE_WORKER_IMAGE and
# ISODE_NATS_IMAGE (built first unless ISODE_SKIP_BUILD=1), and the four
# passwords (random unless set). It never reads or writes deploy/.env.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
export ISODE_COMPOSE_PROJECT=${ISODE_COMPOSE_PROJECT:-isodedemo$$}
project=$ISODE_COMPOSE_PROJECT
WORKERS=${WORKERS:-3}
pw() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
export ISODE_APP_A_PASSWORD=${ISODE_APP_A_PASSWORD:-$(pw)}
export ISODE_APP_B_PASSWORD=${ISODE_APP_B_PASSWORD:-$(pw)}
export ISODE_WORKER_PASSWORD=${ISODE_WORKER_PASSWORD:-$(pw)}
export ISODE_OPS_PASSWORD=${ISODE_OPS_PASSWORD:-$(pw)}
if [[ -z "${ISODE_NATS_PORT:-}" ]]; then
	ISODE_NATS_PORT=4250
	while (exec 3<>"/dev/tcp/127.0.0.1/$ISODE_NATS_PORT") 2>/dev/null; do ISODE_NATS_PORT=$((ISODE_NATS_PORT + 1)); done
fi
export ISODE_NATS_PORT
app="nats://app-a:$ISODE_APP_A_PASSWORD@127.0.0.1:$ISODE_NATS_PORT"
appb="nats://app-b:$ISODE_APP_B_PASSWORD@127.0.0.1:$ISODE_NATS_PORT"
ops="nats://ops:$ISODE_OPS_PASSWORD@127.0.0.1:$ISODE_NATS_PORT"
compose() { ./scripts/compose.sh "$@"; }

tmp=$(mktemp -d)
up=
cleanup() {
	if [[ -n $up ]]; then
		echo "==> tearing down after a failure; the workers said:" >&2
		compose logs --tail 20 worker >&2 || true
		compose down -v --remove-orphans -t 30 >/dev/null 2>&1 || true
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT

if [[ "${ISODE_SKIP_BUILD:-}" != 1 ]]; then
	echo "==> building the images"
	./scripts/build-images.sh
fi
CGO_ENABLED=0 $GO build -o "$tmp/submit" ./cmd/submit
submit() { "$tmp/submit" "$@"; }

echo "==> docker compose up: NATS and $WORKERS workers (project $project, NATS on 127.0.0.1:$ISODE_NATS_PORT)"
up=1
compose up -d --scale "worker=$WORKERS" 2>&1 | grep -v '^$' || true

# Ready when every worker answers stats and the shards add up.
ready=
for _ in $(seq 1 180); do
	if submit stats --nats "$ops" --wait 500ms >"$tmp/stats" 2>/dev/null &&
		awk -v n="$WORKERS" 'NR > 1 { w++; s += $2 } END { exit !(w == n && s == 64) }' "$tmp/stats"; then
		ready=1
		break
	fi
	sleep 0.5
done
if [[ -z $ready ]]; then
	cat "$tmp/stats" >&2 || true
	echo "the workers did not all join within 90s" >&2
	exit 1
fi
workers=$(awk 'NR > 1 { print $1 }' "$tmp/stats" | tr '\n' ' ')
echo "workers: $workers"

run() {
	echo
	echo "==> submit run --tenant $1 '$2'   (as application app-a)"
	submit run --nats "$app" --tenant "$1" "$2"
}
run tenant1 'return function (cb) { cb(null, "Hello, world!"); }'
run tenant2 'return function (cb) { cb(null, process.versions); }'

# Application app-b's tenant1 is not app-a's: what one leaves in its
# sandbox's globals the other does not see.
echo
echo "==> app-a's tenant1 leaves a global; app-b's tenant1 looks for it"
submit run --nats "$app" --tenant tenant1 'return function (cb) { globalThis.note = "left by app-a"; cb(null, globalThis.note); }'
submit run --nats "$appb" --tenant tenant1 'return function (cb) { cb(null, "app-b sees: " + (globalThis.note || "nothing")); }' | tee "$tmp/appb"
grep -q "app-b sees: nothing" "$tmp/appb" || { echo "app-b's tenant1 saw app-a's" >&2; exit 1; }

echo
echo "==> submit stats   (as the ops user)"
submit stats --nats "$ops"

echo
echo "==> the sandboxes' agents speak over their unix sockets (ISODE_AGENT_SOCKETS)"
for w in $workers; do
	ids=$(docker ps -q --filter "label=io.isode.worker=$w")
	if [[ -z $ids ]]; then
		echo "worker $w has no sandbox" >&2
		exit 1
	fi
	# shellcheck disable=SC2086
	if docker inspect --format '{{range .Mounts}}{{.Destination}} {{end}}' $ids | grep -v -q '/run/isode'; then
		echo "a sandbox of worker $w has no agent socket" >&2
		exit 1
	fi
done
if compose logs --no-color worker 2>&1 | grep -q 'cannot reach their sockets'; then
	echo "a worker went back to the attach streams:" >&2
	compose logs --no-color worker 2>&1 | grep 'cannot reach their sockets' >&2
	exit 1
fi
echo "every sandbox has its socket"

echo
echo "==> submit stats as application app-a is refused"
if ! submit stats --nats "$app" 2>&1 | grep -q "no worker answered"; then
	echo "application app-a could read the workers' stats" >&2
	exit 1
fi
echo "refused"

# Nobody but app-a's refused stats request hit a permission.
violations=$(compose logs --no-color nats 2>&1 | grep -i "violation" | grep -v -E 'user:app-a".* - Publish Violation - Subject "isode.stats"' || true)
if [[ -n $violations ]]; then
	echo "permission violations in the NATS log:" >&2
	echo "$violations" >&2
	exit 1
fi

echo
echo "==> docker compose down -v"
compose down -v --remove-orphans -t 30 2>&1 | grep -v '^$' || true
up=

left() {
	docker ps -aq --filter "label=com.docker.compose.project=$project"
	docker network ls -q --filter "label=com.docker.compose.project=$project"
	docker volume ls -q --filter "label=com.docker.compose.project=$project"
	for w in $workers; do docker ps -aq --filter "label=io.isode.worker=$w"; done
}
# Sandboxes of a stopped worker go away as their AutoRemove completes.
for _ in $(seq 1 60); do
	[[ -z "$(left)" ]] && break
	sleep 0.5
done
if [[ -n "$(left)" ]]; then
	echo "left behind:" >&2
	left >&2
	exit 1
fi
echo "nothing left behind: no container, network or volume of project $project, no sandbox of its workers"
