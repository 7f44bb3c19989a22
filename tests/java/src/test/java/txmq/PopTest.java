package txmq;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import org.apache.rocketmq.client.consumer.DefaultMQPushConsumer;
import org.apache.rocketmq.client.consumer.listener.ConsumeConcurrentlyStatus;
import org.apache.rocketmq.client.consumer.listener.MessageListenerConcurrently;
import org.apache.rocketmq.common.consumer.ConsumeFromWhere;
import org.apache.rocketmq.common.message.MessageExt;
import org.junit.jupiter.api.Test;

/**
 * A POP push consumer (5.x, `setClientRebalance(false)`): two instances pop from the
 * topic (the broker assigns "any queue"), ack what they consumed, and the one message
 * that fails once comes again after its changed invisible time.
 */
class PopTest {
    @Test
    void popConsumersShareATopicAndGetAFailureAgain() throws Exception {
        String run = Broker.run();
        String topic = "java-pop-" + run;
        String group = "java-pop-group-" + run;
        ConsumerTest.produce(topic, "pop-", 30);
        Set<String> done = ConcurrentHashMap.newKeySet();
        Map<String, AtomicInteger> attempts = new ConcurrentHashMap<>();
        DefaultMQPushConsumer[] consumers = new DefaultMQPushConsumer[2];
        try {
            for (int i = 0; i < 2; i++) {
                DefaultMQPushConsumer c = new DefaultMQPushConsumer(group);
                c.setNamesrvAddr(Broker.namesrv());
                c.setInstanceName("pop-" + i);
                c.setClientRebalance(false);
                c.setPopInvisibleTime(20_000);
                c.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET);
                c.subscribe(topic, "*");
                c.registerMessageListener((MessageListenerConcurrently) (msgs, ctx) -> {
                    for (MessageExt m : msgs) {
                        String b = ConsumerTest.body(m);
                        int n = attempts.computeIfAbsent(b, k -> new AtomicInteger()).incrementAndGet();
                        if (b.equals("pop-7") && n == 1) {
                            return ConsumeConcurrentlyStatus.RECONSUME_LATER;
                        }
                    }
                    for (MessageExt m : msgs) {
                        done.add(ConsumerTest.body(m));
                    }
                    return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
                });
                c.start();
                consumers[i] = c;
            }
            long deadline = System.currentTimeMillis() + 90_000;
            while (done.size() < 30 && System.currentTimeMillis() < deadline) {
                TimeUnit.MILLISECONDS.sleep(100);
            }
            Set<String> expect = new TreeSet<>();
            for (int i = 0; i < 30; i++) {
                expect.add("pop-" + i);
            }
            assertEquals(expect, new TreeSet<>(done), "attempts " + attempts);
            assertTrue(attempts.get("pop-7").get() >= 2, "pop-7 came again: " + attempts.get("pop-7"));
            // The acks are one-way from the listener's view: give the last ones a moment.
            TimeUnit.SECONDS.sleep(2);
        } finally {
            for (DefaultMQPushConsumer c : consumers) {
                if (c != null) {
                    c.shutdown();
                }
            }
        }
    }
}
