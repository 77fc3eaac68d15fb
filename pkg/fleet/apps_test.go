package fleet_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/pkg/protocol"
)

// tenantEcho answers with the isolate key the runner was given.
var tenantEcho = runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
	v, _ := json.Marshal(req.IsolateKey)
	return &protocol.Result{Value: v}, nil
})

// A stream made by a worker from before applications (one subject, one
// filter per consumer, no per-subject limit) is brought up to date by a
// new worker, which then serves an application's requests: their runner
// gets the tenant within the application, and the reply goes under the
// application's reply subject, whatever Isode-Reply-To says.
func TestApplicationsOnAnOlderStream(t *testing.T) {
	e := newEnv(t)
	js, _ := jetstream.New(e.nc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "ISODE", Subjects: []string{"isode.run.*"},
		Retention: jetstream.WorkQueuePolicy, Discard: jetstream.DiscardNew, Duplicates: 2 * time.Minute,
		AllowMsgTTL: true, Metadata: map[string]string{"isode.shards": "8", "isode.protocol": "1"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{Durable: "isode-shard-3",
		FilterSubject: "isode.run.3", AckPolicy: jetstream.AckExplicitPolicy}); err != nil {
		t.Fatal(err)
	}
	startWorker(t, e, tenantEcho, testConfig("w1"))

	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(info.Config.Subjects) != 3 || info.Config.MaxMsgsPerSubject != 1000 || !info.Config.DiscardNewPerSubject {
		t.Fatalf("stream not brought up to date: %+v", info.Config)
	}

	replies, err := e.nc.SubscribeSync("isode.reply.app-a.>")
	if err != nil {
		t.Fatal(err)
	}
	plain, err := e.nc.SubscribeSync("_INBOX.victim")
	if err != nil {
		t.Fatal(err)
	}
	for shard := 0; shard < 8; shard++ {
		key := shardKey(shard, 8)
		m := nats.NewMsg(protocol.AppRunSubject("isode", "app-a", shard))
		m.Data = []byte(`{"v":1,"isolate_key":"` + key + `","code":"x"}`)
		m.Header.Set(protocol.HeaderMsgID, "app-a-"+key)
		m.Header.Set(protocol.HeaderReplyTo, "_INBOX.victim")
		if _, err := js.PublishMsg(ctx, m); err != nil {
			t.Fatal(err)
		}
		rm, err := replies.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatalf("shard %d: no reply under isode.reply.app-a: %v", shard, err)
		}
		var rep protocol.Reply
		if err := json.Unmarshal(rm.Data, &rep); err != nil || rep.Error != nil {
			t.Fatalf("shard %d: %s", shard, rm.Data)
		}
		if rm.Subject != "isode.reply.app-a._INBOX.victim" || string(rep.Result) != `"app-a|`+key+`"` {
			t.Fatalf("shard %d: reply on %s with %s", shard, rm.Subject, rep.Result)
		}
	}
	if m, err := plain.NextMsg(200 * time.Millisecond); err == nil {
		t.Fatalf("a reply went to the subject the request named: %s", m.Data)
	}
	// The implicit application is as before.
	rctx, rcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer rcancel()
	res, err := newClient(t, e, 8).Run(rctx, "plain-key", "x")
	if err != nil || string(res.Value) != `"plain-key"` {
		t.Fatalf("implicit application: %v %v", res, err)
	}
}

// shardKey returns an isolate key of shard.
func shardKey(shard, shards int) string {
	for i := 0; ; i++ {
		k := "k" + string(rune('a'+i%26)) + string(rune('a'+i/26%26)) + string(rune('a'+i/676%26))
		if protocol.Shard(k, shards) == shard {
			return k
		}
	}
}

// An application's call (its import maps isode.call to
// isode.app.<application>.call) runs as that application's tenant and is
// answered on the call's own reply subject; a call on a subject naming no
// valid application is dropped.
func TestApplicationCall(t *testing.T) {
	e := newEnv(t)
	startWorker(t, e, tenantEcho, testConfig("w1"))
	m, err := e.nc.Request(protocol.AppCallSubject("isode", "app-b"), []byte(`{"v":1,"isolate_key":"t1","code":"x"}`), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var rep protocol.Reply
	if err := json.Unmarshal(m.Data, &rep); err != nil || string(rep.Result) != `"app-b|t1"` {
		t.Fatalf("call: %s (%v)", m.Data, err)
	}
	if _, err := e.nc.Request("isode.app.default.call", []byte(`{"v":1,"isolate_key":"t1","code":"x"}`), 500*time.Millisecond); err == nil {
		t.Fatal("a call naming the reserved application was answered")
	}
}
