package dockerx_test

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/sandbox"
)

// BenchmarkAgentDelivery measures create-to-ready of one sandbox (create,
// attach, start, readiness handshake) with the agent passed on node's
// command line, as the worker does, against the agent started from files
// baked into the image, as before; both on one image (node plus
// /agent/agent.js and worker.js), alternating, in the same run:
//
//	go test -run '^$' -bench AgentDelivery -benchtime 20x ./pkg/dockerx/
func BenchmarkAgentDelivery(b *testing.B) {
	cli := testenv.Docker(b)
	files := map[string]string{}
	for _, f := range []string{"agent.js", "worker.js"} {
		src, err := os.ReadFile("../../sandbox/" + f)
		if err != nil {
			b.Fatal(err)
		}
		files["/agent/"+f] = string(src)
	}
	img := testenv.BuildImage(b, cli, "isode-test-delivery:"+randomHex(6), testenv.ImageSpec{Node: "/usr/bin/node", Files: files})
	e := newEnv(b, func(c *dockerx.Config) { c.Image = img })
	fromFile := append(sandbox.NodeFlags(), "/agent/agent.js")

	ctx := context.Background()
	createReady := func(args []string) time.Duration {
		dockerx.SetNodeArgs(e.rt, args)
		start := time.Now()
		s := e.create("")
		d := time.Since(start)
		if err := s.Close(ctx); err != nil {
			b.Fatal(err)
		}
		return d
	}
	createReady(nil) // warm the engine's caches of the image
	createReady(fromFile)
	var eval, file time.Duration
	b.ResetTimer()
	for b.Loop() {
		eval += createReady(nil)
		file += createReady(fromFile)
	}
	b.StopTimer()
	b.ReportMetric(float64(eval.Nanoseconds())/float64(b.N), "eval-ns/op")
	b.ReportMetric(float64(file.Nanoseconds())/float64(b.N), "file-ns/op")
	b.ReportMetric(float64(eval)/float64(file), "eval/file")
}
