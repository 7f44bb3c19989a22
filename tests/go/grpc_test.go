// The official RocketMQ 5 Go client (gRPC) against txmq: a producer, a transaction its
// checker is not needed for, and a simple consumer. Run by tests/tests/grpc.rs
// (TXMQ_GRPC, TXMQ_RUN).
package txmqtests

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	rmq "github.com/apache/rocketmq-clients/golang/v5"
	"github.com/apache/rocketmq-clients/golang/v5/credentials"
)

func TestGrpcProducerTransactionAndSimpleConsumer(t *testing.T) {
	os.Setenv("mq.consoleAppender.enabled", "false")
	os.Setenv("rocketmq.client.logRoot", t.TempDir())
	rmq.ResetLogger()
	endpoint := env(t, "TXMQ_GRPC")
	run := env(t, "TXMQ_RUN")
	topic := "go-grpc-" + run
	ctx := context.Background()
	creds := &credentials.SessionCredentials{AccessKey: "", AccessSecret: ""}

	p, err := rmq.NewProducer(&rmq.Config{Endpoint: endpoint, Credentials: creds},
		rmq.WithTopics(topic),
		rmq.WithTransactionChecker(&rmq.TransactionChecker{
			Check: func(*rmq.MessageView) rmq.TransactionResolution { return rmq.COMMIT },
		}))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer p.GracefulStop()
	for i := 0; i < 5; i++ {
		m := &rmq.Message{Topic: topic, Body: []byte(fmt.Sprintf("grpc-%d", i))}
		m.SetTag("GoTag")
		m.SetKeys(fmt.Sprintf("k%d", i))
		if _, err := p.Send(ctx, m); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	tx := p.BeginTransaction()
	if _, err := p.SendWithTransaction(ctx, &rmq.Message{Topic: topic, Body: []byte("grpc-txn")}, tx); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}

	sc, err := rmq.NewSimpleConsumer(&rmq.Config{Endpoint: endpoint, ConsumerGroup: "go-simple-" + run,
		Credentials: creds},
		rmq.WithAwaitDuration(5*time.Second),
		rmq.WithSubscriptionExpressions(map[string]*rmq.FilterExpression{topic: rmq.SUB_ALL}))
	if err != nil {
		t.Fatal(err)
	}
	if err := sc.Start(); err != nil {
		t.Fatal(err)
	}
	defer sc.GracefulStop()
	seen := map[string]bool{}
	deadline := time.Now().Add(60 * time.Second)
	for len(seen) < 6 && time.Now().Before(deadline) {
		mvs, err := sc.Receive(ctx, 16, 20*time.Second)
		if err != nil {
			continue
		}
		for _, mv := range mvs {
			seen[string(mv.GetBody())] = true
			if err := sc.Ack(ctx, mv); err != nil {
				t.Fatalf("ack: %v", err)
			}
		}
	}
	if len(seen) != 6 {
		t.Fatalf("received %d of 6: %v", len(seen), seen)
	}
}
