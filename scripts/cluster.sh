#!/usr/bin/env bash
# Runs Docker Compose on the cluster deployment, deploy/compose.cluster.yaml
# (three clustered NATS servers and the workers), through scripts/compose.sh
# (v1 or v2, deploy/.env generated once).
#   scripts/cluster.sh up -d --scale worker=3      (make cluster-up)
#   scripts/cluster.sh down -v --remove-orphans    (make cluster-down)
# ISODE_COMPOSE_PROJECT names the project (default: isode-cluster);
# ISODE_CLUSTER_CLIENT_PORTS=1 also publishes nats-2's and nats-3's client
# ports (ISODE_NATS_PORT_2, ISODE_NATS_PORT_3; compose.cluster.clients.yaml).
set -euo pipefail
export ISODE_COMPOSE_PROJECT=${ISODE_COMPOSE_PROJECT:-isode-cluster}
export ISODE_COMPOSE_FILES=compose.cluster.yaml
if [[ "${ISODE_CLUSTER_CLIENT_PORTS:-}" == 1 ]]; then
	ISODE_COMPOSE_FILES+=" compose.cluster.clients.yaml"
fi
exec "$(dirname "$0")/compose.sh" "$@"
