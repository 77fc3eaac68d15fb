# The isode worker: a static Go binary FROM scratch, nothing else.
# scripts/build-images.sh (make images) compiles it on the host with
# CGO_ENABLED=0 and builds this file in a context holding only the binary,
# so no registry and no Go toolchain image is needed.
#
# It runs as root inside its container only to use the Docker socket it is
# given (see deploy/README.md); compose.yaml drops every capability.
FROM scratch
COPY worker /worker
ENTRYPOINT ["/worker"]
