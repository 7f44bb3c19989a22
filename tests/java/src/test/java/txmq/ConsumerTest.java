package txmq;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import org.apache.rocketmq.client.consumer.DefaultLitePullConsumer;
import org.apache.rocketmq.client.consumer.DefaultMQPushConsumer;
import org.apache.rocketmq.client.consumer.listener.ConsumeConcurrentlyStatus;
import org.apache.rocketmq.client.consumer.listener.ConsumeOrderlyStatus;
import org.apache.rocketmq.client.consumer.listener.MessageListenerConcurrently;
import org.apache.rocketmq.client.consumer.listener.MessageListenerOrderly;
import org.apache.rocketmq.client.producer.DefaultMQProducer;
import org.apache.rocketmq.client.producer.SendResult;
import org.apache.rocketmq.client.producer.SendStatus;
import org.apache.rocketmq.common.consumer.ConsumeFromWhere;
import org.apache.rocketmq.common.message.Message;
import org.apache.rocketmq.common.message.MessageExt;
import org.junit.jupiter.api.Test;

/**
 * DefaultMQPushConsumer (concurrently, four of one group sharing a topic's queues),
 * a consumer that fails a message until it is dead-lettered, and DefaultLitePullConsumer.
 */
class ConsumerTest {
    static String body(MessageExt m) {
        return new String(m.getBody(), StandardCharsets.UTF_8);
    }

    static void produce(String topic, String prefix, int n) throws Exception {
        DefaultMQProducer p = ProducerTest.producer("java-consumer-feed-" + Broker.run());
        try {
            for (int i = 0; i < n; i++) {
                Message m = ProducerTest.message(topic, "T", "key-" + i, prefix + i);
                assertEquals(SendStatus.SEND_OK, p.send(m).getSendStatus());
            }
        } finally {
            p.shutdown();
        }
    }

    static DefaultMQPushConsumer push(String group, String topic, String instance, MessageListenerConcurrently l)
            throws Exception {
        DefaultMQPushConsumer c = new DefaultMQPushConsumer(group);
        c.setNamesrvAddr(Broker.namesrv());
        c.setInstanceName(instance);
        c.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET);
        c.subscribe(topic, "*");
        c.registerMessageListener(l);
        c.start();
        return c;
    }

    /** Four members each take a share; every message arrives, none is lost. */
    @Test
    void fourPushConsumersShareATopic() throws Exception {
        String run = Broker.run();
        String topic = "java-push-" + run;
        int n = 200;
        Set<String> seen = ConcurrentHashMap.newKeySet();
        Map<Integer, AtomicInteger> perConsumer = new ConcurrentHashMap<>();
        CountDownLatch all = new CountDownLatch(n);
        List<DefaultMQPushConsumer> consumers = new ArrayList<>();
        try {
            for (int i = 0; i < 4; i++) {
                int me = i;
                perConsumer.put(me, new AtomicInteger());
                consumers.add(push("java-push-group-" + run, topic, "push-" + i, (msgs, ctx) -> {
                    for (MessageExt m : msgs) {
                        perConsumer.get(me).incrementAndGet();
                        if (seen.add(body(m))) {
                            all.countDown();
                        }
                    }
                    return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
                }));
            }
            // Let the four rebalance (each takes two of the eight queues).
            Thread.sleep(3000);
            produce(topic, "push-", n);
            assertTrue(all.await(90, TimeUnit.SECONDS), () -> "received " + seen.size() + " of " + n);
            for (var e : perConsumer.entrySet()) {
                assertTrue(e.getValue().get() > 0, () -> "consumer " + e.getKey() + " got nothing: " + perConsumer);
            }
        } finally {
            consumers.forEach(DefaultMQPushConsumer::shutdown);
        }
    }

    /** A message the listener keeps failing is retried, then dead-lettered. */
    @Test
    void failuresAreRetriedThenDeadLettered() throws Exception {
        String run = Broker.run();
        String topic = "java-retry-" + run;
        AtomicInteger attempts = new AtomicInteger();
        CountDownLatch ok = new CountDownLatch(1);
        DefaultMQPushConsumer c = push("java-retry-group-" + run, topic, "retry", (msgs, ctx) -> {
            for (MessageExt m : msgs) {
                if (body(m).equals("fail")) {
                    attempts.incrementAndGet();
                    ctx.setDelayLevelWhenNextConsume(1);
                    return ConsumeConcurrentlyStatus.RECONSUME_LATER;
                }
                ok.countDown();
            }
            return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
        });
        c.setMaxReconsumeTimes(2);
        try {
            Thread.sleep(2000);
            DefaultMQProducer p = ProducerTest.producer("java-retry-feed-" + run);
            p.send(ProducerTest.message(topic, "T", "k", "fail"));
            p.send(ProducerTest.message(topic, "T", "k", "fine"));
            p.shutdown();
            assertTrue(ok.await(60, TimeUnit.SECONDS), "the good message arrived");
            long until = System.currentTimeMillis() + 60_000;
            while (attempts.get() < 3 && System.currentTimeMillis() < until) {
                Thread.sleep(200);
            }
            // Once, and twice again (maxReconsumeTimes): then the dead letters.
            Thread.sleep(4000);
            assertEquals(3, attempts.get());
        } finally {
            c.shutdown();
        }
        // An operator reads the group's dead letters as the topic %DLQ%<group>.
        Set<String> dead = ConcurrentHashMap.newKeySet();
        DefaultMQPushConsumer reader = push("java-dlq-reader-" + run, "%DLQ%java-retry-group-" + run, "dlq",
                (msgs, ctx) -> {
                    for (MessageExt m : msgs) {
                        dead.add(body(m) + " from " + m.getProperty("RETRY_TOPIC"));
                    }
                    return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
                });
        try {
            long until = System.currentTimeMillis() + 60_000;
            while (dead.isEmpty() && System.currentTimeMillis() < until) {
                Thread.sleep(200);
            }
            assertEquals(Set.of("fail from " + topic), dead);
        } finally {
            reader.shutdown();
        }
    }

    /** MessageListenerOrderly: it consumes only the queues the broker locked for it. */
    @Test
    void orderlyConsumerHoldsItsQueueLocks() throws Exception {
        String run = Broker.run();
        String topic = "java-orderly-" + run;
        int n = 30;
        Set<String> seen = ConcurrentHashMap.newKeySet();
        CountDownLatch all = new CountDownLatch(n);
        DefaultMQPushConsumer c = new DefaultMQPushConsumer("java-orderly-group-" + run);
        c.setNamesrvAddr(Broker.namesrv());
        c.setInstanceName("orderly");
        c.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET);
        c.subscribe(topic, "*");
        c.registerMessageListener((MessageListenerOrderly) (msgs, ctx) -> {
            for (MessageExt m : msgs) {
                if (seen.add(body(m))) {
                    all.countDown();
                }
            }
            return ConsumeOrderlyStatus.SUCCESS;
        });
        c.start();
        try {
            DefaultMQProducer p = ProducerTest.producer("java-orderly-feed-" + run);
            for (int i = 0; i < n; i++) {
                Message m = ProducerTest.message(topic, "T", "order-" + (i % 3), "orderly-" + i);
                // RocketMQ's ordering idiom: the order id picks the queue.
                SendResult r = p.send(m, (mqs, msg, arg) -> mqs.get((Integer) arg % mqs.size()), i % 3);
                assertEquals(SendStatus.SEND_OK, r.getSendStatus());
            }
            p.shutdown();
            assertTrue(all.await(90, TimeUnit.SECONDS), () -> "received " + seen.size() + " of " + n);
        } finally {
            c.shutdown();
        }
    }

    /** DefaultLitePullConsumer, subscribe mode with auto-commit. */
    @Test
    void litePullConsumerPolls() throws Exception {
        String run = Broker.run();
        String topic = "java-lite-" + run;
        produce(topic, "lite-", 20);
        DefaultLitePullConsumer c = new DefaultLitePullConsumer("java-lite-group-" + run);
        c.setNamesrvAddr(Broker.namesrv());
        c.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET);
        c.subscribe(topic, "*");
        c.start();
        Set<String> seen = ConcurrentHashMap.newKeySet();
        try {
            long until = System.currentTimeMillis() + 90_000;
            while (seen.size() < 20 && System.currentTimeMillis() < until) {
                for (MessageExt m : c.poll(1000)) {
                    seen.add(body(m));
                }
            }
            assertEquals(20, seen.size(), () -> "received " + seen);
        } finally {
            c.shutdown();
        }
    }
}
