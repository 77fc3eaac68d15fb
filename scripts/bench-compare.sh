#!/usr/bin/env bash
# Compares this tree's worker with the worker of an older commit in one run,
# on this machine: both are measured with this tree's submit bench and CPU
# sampler (BENCH_CPU=1), alternately, ROUNDS times, the order swapped every
# round so that drift in the machine's load falls on both alike.
#   scripts/bench-compare.sh BASE [SUBMIT BENCH ARGS...]
# BASE is checked out in a worktree under /tmp (kept for the next run) and
# its worker built there. BENCH_WORKER holds the worker's flags. Prints one
# line per measurement and the new/base ratios of each round; OUT names a
# directory that keeps each measurement's JSON report (side-round.json).
# BASE_EXTRA and NEW_EXTRA add worker flags to one side only: BASE=HEAD
# BASE_EXTRA='--agent-sockets none' measures one setting against another.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: scripts/bench-compare.sh BASE [SUBMIT BENCH ARGS...]}
shift
rev=$(git rev-parse --short "$base^{commit}")
dir=${BASE_DIR:-/tmp/isode-base-$rev}
if [ ! -d "$dir" ]; then
	git worktree add --detach "$dir" "$rev" >/dev/null
elif [ "$(git -C "$dir" rev-parse --short HEAD)" != "$rev" ]; then
	git -C "$dir" checkout -q --detach "$rev" # a kept worktree of another commit
fi
(cd "$dir" && CGO_ENABLED=0 go build -trimpath -o bin/ ./cmd/worker)
BIN=${BIN:-bin}
CGO_ENABLED=0 go build -trimpath -o "$BIN/" ./cmd/worker ./cmd/submit
ROUNDS=${ROUNDS:-2}
BENCH_WORKER=${BENCH_WORKER:---low 4 --high 64}
[ $# -gt 0 ] || set -- --scenario warm --tenants 50 --concurrency 32 --duration 15s
if [ -n "${OUT:-}" ]; then
	out=$OUT
	mkdir -p "$out"
else
	out=$(mktemp -d)
	trap 'rm -rf "$out"' EXIT
fi

summary='. as $r | .results[-1] as $w
  | [($w.per_second|floor), $w.latency_us.p50, $w.latency_us.p99,
     ($w.cpu.cpu_per_run_us // 0 | floor),
     ([$w.cpu.components[]? | select(.name == "sandboxes") | .cpu_per_run_us][0] // 0 | floor),
     ([$w.cpu.components[]? | select(.name == "worker") | .cpu_per_run_us][0] // 0 | floor),
     ([$w.cpu.components[]? | select(.name == "containerd-shim" or .name == "dockerd") | .cpu_per_run_us] | add // 0 | floor),
     ($w.cpu.cores_busy // 0 | . * 100 | floor / 100)] | @tsv'
printf '%-6s %-5s %8s %9s %9s %12s %13s %10s %16s %6s\n' round side runs/s p50_us p99_us cpu/run_us sandboxes_us worker_us dockerd+shims_us cores
for r in $(seq 1 "$ROUNDS"); do
	order="base new"
	[ $((r % 2)) -eq 0 ] && order="new base"
	for side in $order; do
		wb=$BIN
		flags="$BENCH_WORKER ${NEW_EXTRA:-}"
		if [ "$side" = base ]; then
			wb=$dir/bin
			flags="$BENCH_WORKER ${BASE_EXTRA:-}"
		fi
		# shellcheck disable=SC2086
		BENCH_CPU=1 WORKER_BIN=$wb BIN=$BIN ./scripts/bench-worker.sh "$flags" --json --quiet --no-baseline "$@" >"$out/$side-$r.json"
		printf '%-6s %-5s ' "$r" "$side"
		jq -r "$summary" "$out/$side-$r.json" | awk -F'\t' '{printf "%8s %9s %9s %12s %13s %10s %16s %6s\n", $1, $2, $3, $4, $5, $6, $7, $8}'
	done
	b=$(jq '.results[-1]' "$out/base-$r.json")
	n=$(jq '.results[-1]' "$out/new-$r.json")
	jq -rn --argjson b "$b" --argjson n "$n" --arg r "$r" \
		'"round \($r): new/base runs/s \($n.per_second / $b.per_second * 100 | floor / 100)x, CPU per run \(if ($b.cpu.cpu_per_run_us // 0) > 0 then ($n.cpu.cpu_per_run_us / $b.cpu.cpu_per_run_us * 100 | floor / 100) else "-" end)x, p50 \($n.latency_us.p50 / $b.latency_us.p50 * 100 | floor / 100)x, p99 \($n.latency_us.p99 / $b.latency_us.p99 * 100 | floor / 100)x"'
done
