# isode: see README.md. The quick start is `make demo` then `make test`.
SHELL := /bin/bash
GO ?= go
ISODE_IMAGE ?= isode-sandbox:latest
export ISODE_IMAGE
BIN := bin
# `make test` must stay under ~15 minutes on a 2-core machine.
TEST_TIMEOUT ?= 14m

.PHONY: all build sandbox-image demo test vet bench clean

all: build sandbox-image

build:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/ ./cmd/...

# Builds the sandbox image offline, from this machine's node binary.
sandbox-image:
	./sandbox/build-image.sh "$(ISODE_IMAGE)"

# Builds what is needed and runs the real system end to end.
demo: build sandbox-image
	BIN=$(BIN) ./scripts/demo.sh

vet:
	$(GO) vet ./...

test: sandbox-image vet static-cache nats-cli
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) ./...

# The official nats CLI, for the test that calls the fleet as a new user
# would (pkg/fleet/cli_test.go finds it on PATH or in $(go env GOPATH)/bin,
# and fails without it when CI is set). Built from the module proxy.
NATS_CLI_VERSION ?= v0.5.0
.PHONY: nats-cli
nats-cli:
	@command -v nats >/dev/null 2>&1 || test -x "$$($(GO) env GOPATH)/bin/nats" || \
		GOBIN="$$($(GO) env GOPATH)/bin" $(GO) install github.com/nats-io/natscli/nats@$(NATS_CLI_VERSION)

# Fuzzes every decoder of input from outside, FUZZTIME inputs each (go test
# takes one package and one target per -fuzz run). CI runs it before make
# test. A count, not a duration: a duration that ends while the fuzzer
# minimises a new input fails the run with "context deadline exceeded".
FUZZTIME ?= 50000x
FUZZ_TARGETS := \
	./pkg/protocol:FuzzDecodeRequest \
	./pkg/protocol:FuzzHeaders \
	./pkg/client:FuzzCheckAck \
	./pkg/fleet:FuzzHeaderValue \
	./pkg/dockerx:FuzzDecodeReply \
	./pkg/dockerx:FuzzFrameReader
.PHONY: fuzz
fuzz:
	set -e; for t in $(FUZZ_TARGETS); do \
		echo "fuzz $${t##*:} ($${t%%:*}) for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$${t##*:}$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 2s "$${t%%:*}"; \
	done

# Compiles the static binaries of the FROM-scratch images once, before the
# tests: deploy's compose test builds those images, and on a cold build
# cache, next to the other packages' tests, that alone took over 4 minutes.
.PHONY: static-cache
static-cache:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w' ./cmd/worker github.com/nats-io/nats-server/v2

# Benchmarks, each next to a baseline measured in the same run (none of them
# is part of make test). BENCH_WORKER holds the flags passed to the worker.
BENCH_WORKER ?= --low 4 --high 64
bench: build sandbox-image
	$(GO) test -run '^$$' -bench . -benchtime 2s ./pkg/fleet/
	$(GO) test -run '^$$' -bench AcquireRelease -benchtime 2s ./pkg/pool/
	$(GO) test -run '^$$' -bench DockerNewTenant -benchtime 20x -timeout 20m ./pkg/pool/
	$(GO) test -run '^$$' -bench WarmRun -benchtime 2s ./pkg/dockerx/
	$(GO) test -run '^$$' -bench 'CreateReady|DockerRunCLI' -benchtime 10x -timeout 20m ./pkg/dockerx/
	$(GO) test -run '^$$' -bench AgentDelivery -benchtime 20x ./pkg/dockerx/
	$(GO) test -run '^$$' -bench WorkerMemory -benchtime 1x ./cmd/worker/
	BIN=$(BIN) ./scripts/bench-worker.sh "$(BENCH_WORKER)" --scenario warm --tenants 1 --concurrency 1 --duration 10s
	BIN=$(BIN) ./scripts/bench-worker.sh "$(BENCH_WORKER)" --scenario new --count 20 --duration 10s
	BIN=$(BIN) ./scripts/bench-worker.sh "$(BENCH_WORKER)" --scenario warm --tenants 50 --concurrency 32 --duration 15s
	BIN=$(BIN) ./scripts/bench-worker.sh "$(BENCH_WORKER) --stream-memory" --scenario warm --tenants 50 --concurrency 32 --duration 15s

# CPU per run of each component (sandboxes, worker, dockerd, shims, the
# bench), read from /proc over a steady window, at 1, 8 and 50 active tenants.
.PHONY: bench-cpu bench-compare
bench-cpu: build sandbox-image
	for n in 1 8 50; do BENCH_CPU=1 BIN=$(BIN) ./scripts/bench-worker.sh "$(BENCH_WORKER)" --scenario warm --tenants $$n --concurrency 32 --duration 15s --quiet --no-baseline || exit 1; done

# This tree's worker against BASE's, alternately, in one run:
#   make bench-compare BASE=edc00cb [ROUNDS=2] [COMPARE_ARGS='--tenants 1 ...']
#   make bench-compare BASE=HEAD BASE_EXTRA='--agent-sockets none'   (one setting against another)
BASE ?= main
COMPARE_ARGS ?= --scenario warm --tenants 50 --concurrency 32 --duration 15s
bench-compare: sandbox-image
	BIN=$(BIN) BENCH_WORKER="$(BENCH_WORKER)" BASE_EXTRA="$(BASE_EXTRA)" NEW_EXTRA="$(NEW_EXTRA)" ./scripts/bench-compare.sh $(BASE) $(COMPARE_ARGS)

# The fleet benchmarks: submit bench against 1, 2 and 3 worker processes, and
# failover time over 10 SIGKILLs (cmd/worker/fleet_bench_test.go).
.PHONY: bench-fleet
bench: bench-fleet
bench-fleet: sandbox-image
	set -o pipefail; $(GO) test -run '^$$' -bench 'Fleet' -benchtime 1x -timeout 30m -v ./cmd/worker/ | grep -v '^ *{'

# The Compose deployment (deploy/README.md): images built locally FROM
# scratch, NATS and WORKERS workers; compose-down leaves nothing behind.
WORKERS ?= 3
.PHONY: images compose-up compose-down compose-demo
images: sandbox-image
	./scripts/build-images.sh

compose-up: images
	./scripts/compose.sh up -d --scale worker=$(WORKERS)

compose-down:
	./scripts/compose.sh down -v --remove-orphans -t 30

# Up, the original examples through submit, stats, down, nothing left.
compose-demo: images
	ISODE_SKIP_BUILD=1 WORKERS=$(WORKERS) ./scripts/compose-demo.sh

# The cluster deployment (deploy/README.md, "A NATS cluster"): three
# clustered NATS servers, the stream and buckets replicated on all three,
# and WORKERS workers; cluster-down leaves nothing behind.
.PHONY: cluster-up cluster-down
cluster-up: images
	./scripts/cluster.sh up -d --scale worker=$(WORKERS)

cluster-down:
	./scripts/cluster.sh down -v --remove-orphans -t 30

# The fault suite on the cluster deployment (deploy/cluster_test.go): kills,
# restarts and partitions under a bystander load; zero accepted requests
# lost. It prints the fault table of deploy/README.md. 3-5 minutes here.
CLUSTER_TEST_TIMEOUT ?= 15m
.PHONY: test-cluster
test-cluster: sandbox-image static-cache
	ISODE_CLUSTER_SUITE=1 $(GO) test -race -count=1 -timeout $(CLUSTER_TEST_TIMEOUT) -run '^TestClusterFaults$$' -v ./deploy/

# Removes every container isode made on this engine (running or not).
clean:
	-docker ps -aq --filter label=io.isode.app=isode | xargs -r docker rm -f
	rm -rf $(BIN)
