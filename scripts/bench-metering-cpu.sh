#!/usr/bin/env bash
# The worker's CPU per warm run, for two builds back to back (say main before
# a change and after it), in alternating rounds: utime+stime of the worker
# process (which holds its embedded NATS server) over a fixed count of runs
# of one tenant by one caller, less the background CPU of an idle window.
#   OLD_BIN=dir NEW_BIN=dir [ROUNDS=3] [RUNS=3000] scripts/bench-metering-cpu.sh
# Each dir holds a worker and a submit binary.
set -euo pipefail
: "${OLD_BIN:?directory of the old worker and submit}" "${NEW_BIN:?directory of the new worker and submit}"
ROUNDS=${ROUNDS:-3}
RUNS=${RUNS:-3000}
ISODE_IMAGE=${ISODE_IMAGE:-isode-sandbox:latest}
tick=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
for round in $(seq 1 "$ROUNDS"); do
	for v in old new; do
		bin=$OLD_BIN
		[ "$v" = new ] && bin=$NEW_BIN
		port=4400
		while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
		data=$(mktemp -d)
		"$bin/worker" --id "cpu-$$-$v" --listen "127.0.0.1:$port" --data-dir "$data/nats" --log-level warn \
			--low 2 --high 8 --image "$ISODE_IMAGE" >"$data/log" 2>&1 &
		wpid=$!
		for _ in $(seq 1 150); do
			"$bin/submit" stats --nats "nats://127.0.0.1:$port" --wait 200ms 2>/dev/null | grep -q "cpu-$$" && break
			sleep 0.2
		done
		bench() { "$bin/submit" bench --nats "nats://127.0.0.1:$port" --tenants 1 --concurrency 1 --count "$1" --no-baseline --quiet 2>&1; }
		bench 200 >/dev/null # the tenant's sandbox, warm
		i0=$(cpu $wpid); t0=$(date +%s%N); sleep 5; i1=$(cpu $wpid); t1=$(date +%s%N)
		c0=$(cpu $wpid); s0=$(date +%s%N)
		out=$(bench "$RUNS" | grep "^warm")
		c1=$(cpu $wpid); s1=$(date +%s%N)
		kill -TERM $wpid
		wait $wpid 2>/dev/null || true
		rm -rf "$data"
		used=$(((c1 - c0) * 1000000 / tick))
		background=$(((i1 - i0) * 1000000 / tick * (s1 - s0) / (t1 - t0)))
		echo "round $round $v: worker CPU $((used / RUNS)) us/run, less idle background $(((used - background) / RUNS)) us/run; $out; load $(cut -d' ' -f1 /proc/loadavg)"
	done
done
