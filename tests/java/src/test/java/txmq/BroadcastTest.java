package txmq;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.util.Set;
import java.util.TreeSet;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.TimeUnit;
import org.apache.rocketmq.client.consumer.DefaultMQPushConsumer;
import org.apache.rocketmq.client.consumer.listener.ConsumeConcurrentlyStatus;
import org.apache.rocketmq.client.consumer.listener.MessageListenerConcurrently;
import org.apache.rocketmq.common.consumer.ConsumeFromWhere;
import org.apache.rocketmq.common.message.MessageExt;
import org.apache.rocketmq.remoting.protocol.heartbeat.MessageModel;
import org.junit.jupiter.api.Test;

/**
 * BROADCASTING push consumers: two instances of one group each receive every message;
 * one stopped and started again goes on from the offsets it kept itself (RocketMQ's
 * clients keep a broadcasting consumer's offsets in a local file).
 */
class BroadcastTest {
    static {
        try {
            // Read once, when the client's local offset store is first loaded.
            System.setProperty("rocketmq.client.localOffsetStoreDir",
                    Files.createTempDirectory("txmq-offsets").toString());
        } catch (java.io.IOException e) {
            throw new IllegalStateException(e);
        }
    }

    static DefaultMQPushConsumer broadcast(String group, String topic, String instance, Set<String> seen)
            throws Exception {
        DefaultMQPushConsumer c = new DefaultMQPushConsumer(group);
        c.setNamesrvAddr(Broker.namesrv());
        c.setInstanceName(instance);
        c.setMessageModel(MessageModel.BROADCASTING);
        c.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET);
        c.subscribe(topic, "*");
        c.registerMessageListener((MessageListenerConcurrently) (msgs, ctx) -> {
            for (MessageExt m : msgs) {
                seen.add(ConsumerTest.body(m));
            }
            return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
        });
        c.start();
        return c;
    }

    static boolean await(Set<String> seen, int n) throws InterruptedException {
        long deadline = System.currentTimeMillis() + 60_000;
        while (seen.size() < n && System.currentTimeMillis() < deadline) {
            TimeUnit.MILLISECONDS.sleep(100);
        }
        return seen.size() >= n;
    }

    static Set<String> bodies(String prefix, int from, int to) {
        Set<String> s = new TreeSet<>();
        for (int i = from; i < to; i++) {
            s.add(prefix + i);
        }
        return s;
    }

    @Test
    void everyInstanceGetsEveryMessageAndKeepsItsPlace() throws Exception {
        String run = Broker.run();
        String topic = "java-bc-" + run;
        String group = "java-bc-group-" + run;
        ConsumerTest.produce(topic, "bc-", 20);
        Set<String> a = ConcurrentHashMap.newKeySet();
        Set<String> b = ConcurrentHashMap.newKeySet();
        DefaultMQPushConsumer ca = broadcast(group, topic, "bc-a", a);
        DefaultMQPushConsumer cb = broadcast(group, topic, "bc-b", b);
        try {
            assertTrue(await(a, 20), "a got " + a.size());
            assertTrue(await(b, 20), "b got " + b.size());
            assertEquals(bodies("bc-", 0, 20), new TreeSet<>(a));
            assertEquals(bodies("bc-", 0, 20), new TreeSet<>(b));
        } finally {
            ca.shutdown();
        }
        // a stopped (its offsets saved); five more; a starts again from where it was.
        ConsumerTest.produce(topic, "bc-more-", 5);
        Set<String> again = ConcurrentHashMap.newKeySet();
        DefaultMQPushConsumer ca2 = broadcast(group, topic, "bc-a", again);
        try {
            assertTrue(await(again, 5), "a again got " + again);
            assertTrue(await(b, 25), "b got " + b.size());
            TimeUnit.SECONDS.sleep(2);
            assertEquals(bodies("bc-more-", 0, 5), new TreeSet<>(again), "only what came after");
        } finally {
            ca2.shutdown();
            cb.shutdown();
        }
    }
}
