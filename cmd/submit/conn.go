package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/protocol"
)

// connFlags are the flags every command shares.
type connFlags struct {
	url    string
	prefix string
	shards int
}

func (c *connFlags) register(fs *flag.FlagSet) {
	def := os.Getenv("ISODE_NATS_URL")
	if def == "" {
		def = nats.DefaultURL
	}
	fs.StringVar(&c.url, "nats", def, "NATS server URL (env ISODE_NATS_URL)")
	fs.StringVar(&c.prefix, "prefix", envOr("ISODE_PREFIX", protocol.DefaultPrefix), "subject prefix of the fleet (env ISODE_PREFIX)")
	fs.IntVar(&c.shards, "shards", protocol.DefaultShards, "shard count of the deployment")
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func (c *connFlags) connect(name string) (*nats.Conn, error) {
	nc, err := nats.Connect(c.url, nats.Name(name), nats.Timeout(5*time.Second))
	if err != nil {
		return nil, fmt.Errorf("connect to NATS at %s: %w (is a worker running? `worker` with no flags starts one with an embedded server)", c.url, err)
	}
	return nc, nil
}

// dial connects and makes a client; close ends both.
func (c *connFlags) dial(name string) (nc *nats.Conn, cl *client.Client, closeAll func(), err error) {
	nc, err = c.connect(name)
	if err != nil {
		return nil, nil, nil, err
	}
	cl, err = client.New(nc, client.WithPrefix(c.prefix), client.WithShards(c.shards))
	if err != nil {
		nc.Close()
		return nil, nil, nil, &exitError{2, err}
	}
	return nc, cl, func() { cl.Close(); nc.Close() }, nil
}
