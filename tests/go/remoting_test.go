// The official RocketMQ Go client v2 (the Remoting protocol) against txmq, unmodified:
// a producer, a transactional producer whose check-back commits, and a push consumer.
// Run by tests/tests/remoting.rs (TXMQ_NAMESRV, TXMQ_RUN).
package txmqtests

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	rocketmq "github.com/apache/rocketmq-client-go/v2"
	"github.com/apache/rocketmq-client-go/v2/consumer"
	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"
	"github.com/apache/rocketmq-client-go/v2/rlog"
)

func env(t *testing.T, name string) string {
	v := os.Getenv(name)
	if v == "" {
		t.Fatalf("%s is not set (tests/tests/remoting.rs sets it)", name)
	}
	return v
}

type checker struct {
	checked chan string
}

func (c *checker) ExecuteLocalTransaction(m *primitive.Message) primitive.LocalTransactionState {
	switch string(m.Body) {
	case "go-txn-commit":
		return primitive.CommitMessageState
	case "go-txn-rollback":
		return primitive.RollbackMessageState
	default:
		return primitive.UnkonwnState
	}
}

func (c *checker) CheckLocalTransaction(m *primitive.MessageExt) primitive.LocalTransactionState {
	if string(m.Body) != "go-txn-unknown" {
		return primitive.UnkonwnState
	}
	select {
	case c.checked <- string(m.Body):
	default:
	}
	return primitive.CommitMessageState
}

func TestRemotingProducerTransactionsAndPushConsumer(t *testing.T) {
	rlog.SetLogLevel("error")
	ns := env(t, "TXMQ_NAMESRV")
	run := env(t, "TXMQ_RUN")
	ctx := context.Background()
	topic := "go-remoting-" + run

	p, err := rocketmq.NewProducer(producer.WithNameServer([]string{ns}),
		producer.WithGroupName("go-producer-"+run), producer.WithRetry(2),
		producer.WithSendMsgTimeout(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10; i++ {
		m := primitive.NewMessage(topic, []byte(fmt.Sprintf("go-%d", i)))
		m.WithTag("GoTag")
		m.WithKeys([]string{fmt.Sprintf("go-key-%d", i)})
		res, err := p.SendSync(ctx, m)
		if err != nil || res.Status != primitive.SendOK {
			t.Fatalf("send %d: %v %v", i, res, err)
		}
	}
	batch := []*primitive.Message{}
	for i := 10; i < 15; i++ {
		batch = append(batch, primitive.NewMessage(topic, []byte(fmt.Sprintf("go-%d", i))))
	}
	if res, err := p.SendSync(ctx, batch...); err != nil || res.Status != primitive.SendOK {
		t.Fatalf("batch: %v %v", res, err)
	}
	_ = p.Shutdown()

	c := &checker{checked: make(chan string, 1)}
	tp, err := rocketmq.NewTransactionProducer(c, producer.WithNameServer([]string{ns}),
		producer.WithGroupName("go-txn-"+run), producer.WithSendMsgTimeout(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if err := tp.Start(); err != nil {
		t.Fatal(err)
	}
	for _, body := range []string{"go-txn-commit", "go-txn-rollback", "go-txn-unknown"} {
		res, err := tp.SendMessageInTransaction(ctx, primitive.NewMessage("go-txn-"+run, []byte(body)))
		if err != nil || res.Status != primitive.SendOK {
			t.Fatalf("%s: %v %v", body, res, err)
		}
	}
	select {
	case <-c.checked:
	case <-time.After(60 * time.Second):
		t.Fatal("the broker did not check back the unknown transaction")
	}
	time.Sleep(500 * time.Millisecond)
	_ = tp.Shutdown()

	var mu sync.Mutex
	seen := map[string]bool{}
	done := make(chan struct{})
	pc, err := rocketmq.NewPushConsumer(consumer.WithGroupName("go-push-"+run),
		consumer.WithNsResolver(primitive.NewPassthroughResolver([]string{ns})),
		consumer.WithConsumeFromWhere(consumer.ConsumeFromFirstOffset))
	if err != nil {
		t.Fatal(err)
	}
	err = pc.Subscribe(topic, consumer.MessageSelector{}, func(ctx context.Context,
		msgs ...*primitive.MessageExt) (consumer.ConsumeResult, error) {
		mu.Lock()
		defer mu.Unlock()
		for _, m := range msgs {
			seen[string(m.Body)] = true
		}
		if len(seen) == 15 {
			select {
			case <-done:
			default:
				close(done)
			}
		}
		return consumer.ConsumeSuccess, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := pc.Start(); err != nil {
		t.Fatal(err)
	}
	defer pc.Shutdown()
	select {
	case <-done:
	case <-time.After(90 * time.Second):
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("received %d of 15: %v", len(seen), seen)
	}
}
