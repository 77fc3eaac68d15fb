#!/usr/bin/env bash
# Builds the deployment's two images with no registry: static Go binaries
# (cmd/worker, and the nats-server of go.mod) copied into FROM-scratch
# images (deploy/*.Dockerfile).
#   scripts/build-images.sh                  # isode-worker:local, isode-nats:local
#   ISODE_WORKER_IMAGE=a:b ISODE_NATS_IMAGE=c:d scripts/build-images.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
WORKER_IMAGE=${ISODE_WORKER_IMAGE:-isode-worker:local}
NATS_IMAGE=${ISODE_NATS_IMAGE:-isode-nats:local}

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/worker" "$ctx/nats"
CGO_ENABLED=0 $GO build -trimpath -ldflags '-s -w' -o "$ctx/worker/worker" ./cmd/worker
CGO_ENABLED=0 $GO build -trimpath -ldflags '-s -w' -o "$ctx/nats/nats-server" github.com/nats-io/nats-server/v2
cp deploy/worker.Dockerfile "$ctx/worker/Dockerfile"
cp deploy/nats.Dockerfile "$ctx/nats/Dockerfile"
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
build() { # image context: quiet unless it fails (the legacy builder warns on every build)
	docker build -q --label "io.isode.revision=$rev" -t "$1" "$2" >"$ctx/build.log" 2>&1 || { cat "$ctx/build.log" >&2; exit 1; }
}
build "$WORKER_IMAGE" "$ctx/worker"
build "$NATS_IMAGE" "$ctx/nats"
echo "built $WORKER_IMAGE and $NATS_IMAGE (revision $rev)"
