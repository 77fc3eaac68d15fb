package main

import (
	"os/exec"
	"syscall"
)

// dieWithTest makes the kernel kill a worker process when the test process
// dies (a test binary that times out panics without running cleanups), so
// no worker outlives its test.
func dieWithTest(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
