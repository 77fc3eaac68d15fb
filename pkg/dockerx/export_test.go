package dockerx

// SetNodeArgs replaces the node arguments of the sandboxes r makes (nil:
// the agent on the command line), so that a benchmark can compare the
// agent started from a file in the image.
func SetNodeArgs(r *Runtime, args []string) { r.nodeArgs = args }

// SetSocketHook has f called with each sandbox's socket directory before
// its container is created, so that a test can spoil it.
func SetSocketHook(r *Runtime, f func(dir string)) { r.sockHook = f }
