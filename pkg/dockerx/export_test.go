package dockerx

// SetNodeArgs replaces the node arguments of the sandboxes r makes (nil:
// the agent on the command line), so that a benchmark can compare the
// agent started from a file in the image.
func SetNodeArgs(r *Runtime, args []string) { r.nodeArgs = args }
