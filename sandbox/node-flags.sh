# Flags of the agent's node process. The worker puts them on node's command
# line (sandbox/program.go reads this line); the node tests read it too.
#
# The main thread only routes frames, so its heap is small; snippets run in
# Workers whose heaps the agent bounds itself (ISODE_WORKER_HEAP_MB).
# shellcheck disable=SC2034
ISODE_NODE_FLAGS=(--max-old-space-size=32 --max-semi-space-size=1)
