package txmq;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.TreeSet;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import org.apache.rocketmq.client.apis.ClientConfiguration;
import org.apache.rocketmq.client.apis.ClientServiceProvider;
import org.apache.rocketmq.client.apis.consumer.ConsumeResult;
import org.apache.rocketmq.client.apis.consumer.FilterExpression;
import org.apache.rocketmq.client.apis.consumer.FilterExpressionType;
import org.apache.rocketmq.client.apis.consumer.PushConsumer;
import org.apache.rocketmq.client.apis.consumer.SimpleConsumer;
import org.apache.rocketmq.client.apis.message.Message;
import org.apache.rocketmq.client.apis.message.MessageView;
import org.apache.rocketmq.client.apis.producer.Producer;
import org.apache.rocketmq.client.apis.producer.SendReceipt;
import org.apache.rocketmq.client.apis.producer.Transaction;
import org.apache.rocketmq.client.apis.producer.TransactionResolution;
import org.junit.jupiter.api.Test;

/**
 * The RocketMQ 5 gRPC Java client (rocketmq-client-java) against txmq's gRPC face:
 * sync and async sends, a simple consumer with an invisible duration that runs out, a
 * push consumer that fails a message once, delivery timestamps, a transactional producer
 * whose checker commits what it left open, and FIFO message groups.
 */
class GrpcClientTest {
    private static final ClientServiceProvider PROVIDER = ClientServiceProvider.loadService();

    /** A suffix that keeps this run's topics and groups apart from another's. */
    private static String run() {
        return System.getProperty("txmq.run", "r");
    }

    private static ClientConfiguration config() {
        String at = System.getProperty("txmq.grpc");
        if (at == null || at.isEmpty()) {
            throw new IllegalStateException("run with -Dtxmq.grpc=HOST:PORT (tests/tests/remoting.rs does)");
        }
        return ClientConfiguration.newBuilder()
                .setEndpoints(at)
                .enableSsl(false)
                .setRequestTimeout(Duration.ofSeconds(10))
                .build();
    }

    private static Message message(String topic, String body) {
        return PROVIDER.newMessageBuilder()
                .setTopic(topic)
                .setTag("TagA")
                .setKeys("key-" + body)
                .setBody(body.getBytes(StandardCharsets.UTF_8))
                .build();
    }

    private static String body(MessageView m) {
        var b = m.getBody().duplicate();
        byte[] bytes = new byte[b.remaining()];
        b.get(bytes);
        return new String(bytes, StandardCharsets.UTF_8);
    }

    private static SimpleConsumer simple(String group, String topic) throws Exception {
        return PROVIDER.newSimpleConsumerBuilder()
                .setClientConfiguration(config())
                .setConsumerGroup(group)
                .setAwaitDuration(Duration.ofSeconds(3))
                .setSubscriptionExpressions(Map.of(topic, FilterExpression.SUB_ALL))
                .build();
    }

    /** Receives until `count` distinct bodies were acked (at most 60 s). */
    private static List<MessageView> drain(SimpleConsumer c, int count) throws Exception {
        List<MessageView> got = new ArrayList<>();
        TreeSet<String> seen = new TreeSet<>();
        long deadline = System.currentTimeMillis() + 60_000;
        while (seen.size() < count && System.currentTimeMillis() < deadline) {
            for (MessageView m : c.receive(16, Duration.ofSeconds(30))) {
                c.ack(m);
                if (seen.add(body(m))) {
                    got.add(m);
                }
            }
        }
        return got;
    }

    @Test
    void sendsAndASimpleConsumer() throws Exception {
        String run = run();
        String topic = "j5-plain-" + run;
        try (Producer p = PROVIDER.newProducerBuilder().setClientConfiguration(config()).setTopics(topic).build()) {
            TreeSet<String> ids = new TreeSet<>();
            for (int i = 0; i < 5; i++) {
                SendReceipt r = p.send(message(topic, "sync-" + i));
                ids.add(r.getMessageId().toString());
            }
            List<CompletableFuture<SendReceipt>> pending = new ArrayList<>();
            for (int i = 0; i < 5; i++) {
                pending.add(p.sendAsync(message(topic, "async-" + i)));
            }
            for (var f : pending) {
                ids.add(f.get(30, TimeUnit.SECONDS).getMessageId().toString());
            }
            assertEquals(10, ids.size(), "each send its own message id");
        }
        try (SimpleConsumer c = simple("j5-simple-" + run, topic)) {
            // One not acked within its invisible duration comes again.
            List<MessageView> first = c.receive(1, Duration.ofSeconds(2));
            long deadline = System.currentTimeMillis() + 30_000;
            while (first.isEmpty() && System.currentTimeMillis() < deadline) {
                first = c.receive(1, Duration.ofSeconds(2));
            }
            assertEquals(1, first.size());
            String unacked = body(first.get(0));
            List<MessageView> all = drain(c, 10);
            TreeSet<String> bodies = new TreeSet<>();
            for (MessageView m : all) {
                bodies.add(body(m));
                assertEquals("TagA", m.getTag().orElse(""));
                assertTrue(m.getKeys().contains("key-" + body(m)), m.getKeys().toString());
                if (body(m).equals(unacked)) {
                    assertTrue(m.getDeliveryAttempt() >= 2, "redelivered: " + m.getDeliveryAttempt());
                }
            }
            TreeSet<String> expect = new TreeSet<>();
            for (int i = 0; i < 5; i++) {
                expect.add("sync-" + i);
                expect.add("async-" + i);
            }
            assertEquals(expect, bodies);
        }
    }

    @Test
    void aDeliveryTimestamp() throws Exception {
        String run = run();
        String topic = "j5-delay-" + run;
        long at;
        try (Producer p = PROVIDER.newProducerBuilder().setClientConfiguration(config()).setTopics(topic).build()) {
            at = System.currentTimeMillis() + 3_000;
            p.send(PROVIDER.newMessageBuilder()
                    .setTopic(topic)
                    .setBody("later".getBytes(StandardCharsets.UTF_8))
                    .setDeliveryTimestamp(at)
                    .build());
        }
        try (SimpleConsumer c = simple("j5-delay-" + run, topic)) {
            List<MessageView> got = drain(c, 1);
            long received = System.currentTimeMillis();
            assertEquals(1, got.size());
            assertEquals("later", body(got.get(0)));
            assertEquals(at, got.get(0).getDeliveryTimestamp().orElse(0L));
            assertTrue(received >= at, "not before its time: " + (at - received) + " ms early");
        }
    }

    @Test
    void aPushConsumerGetsWhatItFailedAgain() throws Exception {
        String run = run();
        String topic = "j5-push-" + run;
        try (Producer p = PROVIDER.newProducerBuilder().setClientConfiguration(config()).setTopics(topic).build()) {
            for (int i = 0; i < 10; i++) {
                p.send(message(topic, "push-" + i));
            }
        }
        Map<String, Integer> attempts = new ConcurrentHashMap<>();
        CountDownLatch done = new CountDownLatch(10);
        try (PushConsumer c = PROVIDER.newPushConsumerBuilder()
                .setClientConfiguration(config())
                .setConsumerGroup("j5-push-" + run)
                .setSubscriptionExpressions(Map.of(topic, new FilterExpression("TagA", FilterExpressionType.TAG)))
                .setMessageListener(m -> {
                    String b = body(m);
                    int n = attempts.merge(b, 1, Integer::sum);
                    if (b.equals("push-3") && n == 1) {
                        return ConsumeResult.FAILURE;
                    }
                    if (n == 1 || b.equals("push-3") && n == 2) {
                        done.countDown();
                    }
                    return ConsumeResult.SUCCESS;
                })
                .build()) {
            assertTrue(done.await(90, TimeUnit.SECONDS), "consumed: " + attempts);
        }
        assertEquals(10, attempts.size(), attempts.toString());
        assertTrue(attempts.get("push-3") >= 2, attempts.toString());
    }

    @Test
    void transactionsWithAChecker() throws Exception {
        String run = run();
        String topic = "j5-txn-" + run;
        CountDownLatch checked = new CountDownLatch(1);
        try (Producer p = PROVIDER.newProducerBuilder()
                .setClientConfiguration(config())
                .setTopics(topic)
                .setTransactionChecker(m -> {
                    if (body(m).equals("txn-open")) {
                        checked.countDown();
                        return TransactionResolution.COMMIT;
                    }
                    return TransactionResolution.UNKNOWN;
                })
                .build()) {
            for (String outcome : new String[] {"commit", "rollback", "open"}) {
                Transaction t = p.beginTransaction();
                SendReceipt r = p.send(message(topic, "txn-" + outcome), t);
                assertNotNull(r.getMessageId());
                switch (outcome) {
                    case "commit" -> t.commit();
                    case "rollback" -> t.rollback();
                    default -> { }
                }
            }
            assertTrue(checked.await(60, TimeUnit.SECONDS), "the broker checked back the open one");
            // Consumed while the producer is still up: the checker's answer has landed.
            try (SimpleConsumer c = simple("j5-txn-" + run, topic)) {
                TreeSet<String> bodies = new TreeSet<>();
                for (MessageView m : drain(c, 2)) {
                    bodies.add(body(m));
                }
                assertEquals(new TreeSet<>(List.of("txn-commit", "txn-open")), bodies);
                // Nothing else comes: the rollback is never delivered.
                List<MessageView> more = c.receive(16, Duration.ofSeconds(30));
                assertTrue(more.isEmpty(), "only the committed two: " + more.size() + " more");
            }
        }
    }

    /** The Rust side made the group `j5-fifo-RUN` ordered before this runs. */
    @Test
    void fifoMessageGroups() throws Exception {
        String run = run();
        String topic = "j5-fifo-" + run;
        try (Producer p = PROVIDER.newProducerBuilder().setClientConfiguration(config()).setTopics(topic).build()) {
            for (int i = 0; i < 5; i++) {
                for (String g : new String[] {"a", "b"}) {
                    p.send(PROVIDER.newMessageBuilder()
                            .setTopic(topic)
                            .setMessageGroup("user-" + g)
                            .setBody((g + "-" + i).getBytes(StandardCharsets.UTF_8))
                            .build());
                }
            }
        }
        List<String> seen = Collections.synchronizedList(new ArrayList<>());
        Map<String, Integer> attempts = new ConcurrentHashMap<>();
        CountDownLatch done = new CountDownLatch(10);
        try (PushConsumer c = PROVIDER.newPushConsumerBuilder()
                .setClientConfiguration(config())
                .setConsumerGroup("j5-fifo-" + run)
                .setSubscriptionExpressions(Map.of(topic, FilterExpression.SUB_ALL))
                .setMessageListener(m -> {
                    String b = body(m);
                    assertEquals("user-" + b.charAt(0), m.getMessageGroup().orElse(""));
                    // a-1 fails once: a-2 must wait until it is taken.
                    if (attempts.merge(b, 1, Integer::sum) == 1 && b.equals("a-1")) {
                        seen.add(b + "!");
                        return ConsumeResult.FAILURE;
                    }
                    seen.add(b);
                    done.countDown();
                    return ConsumeResult.SUCCESS;
                })
                .build()) {
            assertTrue(done.await(90, TimeUnit.SECONDS), "consumed: " + seen);
        }
        TreeMap<Character, List<String>> byGroup = new TreeMap<>();
        synchronized (seen) {
            for (String s : seen) {
                if (!s.endsWith("!")) {
                    byGroup.computeIfAbsent(s.charAt(0), k -> new ArrayList<>()).add(s);
                }
            }
            assertTrue(seen.indexOf("a-1!") < seen.indexOf("a-1"), seen.toString());
            assertFalse(seen.indexOf("a-2") < seen.indexOf("a-1"), seen.toString());
        }
        for (char g : new char[] {'a', 'b'}) {
            List<String> expect = new ArrayList<>();
            for (int i = 0; i < 5; i++) {
                expect.add(g + "-" + i);
            }
            assertEquals(expect, byGroup.get(g), "in order within user-" + g + ": " + seen);
        }
    }
}
