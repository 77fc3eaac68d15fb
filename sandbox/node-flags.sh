# Flags of the agent's node process. The worker puts them on node's command
# line (sandbox/program.go reads this line); the node tests read it too.
#
# The main thread only routes frames, so its heap is small; snippets run in
# Workers whose heaps the agent bounds itself (ISODE_WORKER_HEAP_MB).
#
# --no-memory-reducer: V8's memory reducer takes an isolate whose allocation
# rate falls as idle and runs full, compacting collections to shrink its
# heap. With many active tenants every sandbox is "idle" between its runs,
# so each of its isolates paid for such collections over and over and its
# next runs faulted the pages in again. Without it, at 50 tenants x 32
# callers: runs/s 1.10x and 1.14x, the sandboxes' CPU per run 0.85-0.91x,
# p99 0.4x; idle sandboxes' memory after a burst did not grow (README,
# Benchmarks). The heaps stay bounded by the limits here and by
# ISODE_WORKER_HEAP_MB, and ordinary collections still run.
# shellcheck disable=SC2034
ISODE_NODE_FLAGS=(--max-old-space-size=32 --max-semi-space-size=1 --no-memory-reducer)
