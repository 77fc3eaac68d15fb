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

test: sandbox-image vet
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) ./...

# Removes every container isode made on this engine (running or not).
clean:
	-docker ps -aq --filter label=io.isode.app=isode | xargs -r docker rm -f
	rm -rf $(BIN)
