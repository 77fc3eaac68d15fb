# Flags of the agent's node process. The worker puts them on node's command
# line (sandbox/program.go reads this line); the node tests read it too.
#
# No V8 heap-size flags (--max-old-space-size, --max-semi-space-size):
# node's built-in code cache, which every worker thread uses to compile
# node's own modules while it starts, is only accepted by a V8 whose flags
# hash to those it was made with. A heap-size flag changes that hash, so
# each snippet thread then compiled node's internals from source: about
# 35 ms more CPU per thread on the 2-vCPU machine (a container to ready:
# 143-156 ms against 108-117 ms, BenchmarkCreateSteps; README, Benchmarks).
# The snippet threads' heaps are bounded by the Worker's resourceLimits
# (ISODE_WORKER_HEAP_MB), which leave the hash alone; the main thread only
# routes frames of at most the frame limit, and the container's memory
# limit bounds the whole process. TestNodeFlagsKeepNodesCodeCache
# (program_test.go) checks any flag added here: node's
# v8.cachedDataVersionTag() must be the same with it as without.
#
# --no-memory-reducer: V8's memory reducer takes an isolate whose allocation
# rate falls as idle and runs full, compacting collections to shrink its
# heap. With many active tenants every sandbox is "idle" between its runs,
# so each of its isolates paid for such collections over and over and its
# next runs faulted the pages in again. Without it, at 50 tenants x 32
# callers: runs/s 1.10x and 1.14x, the sandboxes' CPU per run 0.85-0.91x,
# p99 0.4x; idle sandboxes' memory after a burst did not grow (README,
# Benchmarks). Ordinary collections still run. It does not change the hash.
# shellcheck disable=SC2034
ISODE_NODE_FLAGS=(--no-memory-reducer)
