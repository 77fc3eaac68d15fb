# Flags of the agent's node process, sourced by build-image.sh. sandbox/Dockerfile
# repeats them in its ENTRYPOINT; agent.test.js checks that the two agree.
#
# The main thread only routes frames, so its heap is small; snippets run in
# Workers whose heaps the agent bounds itself (ISODE_WORKER_HEAP_MB).
# shellcheck disable=SC2034
ISODE_NODE_FLAGS=(--max-old-space-size=32 --max-semi-space-size=1)
