package txmq;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ConcurrentLinkedQueue;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import org.apache.rocketmq.client.producer.DefaultMQProducer;
import org.apache.rocketmq.client.producer.SendCallback;
import org.apache.rocketmq.client.producer.SendResult;
import org.apache.rocketmq.client.producer.SendStatus;
import org.apache.rocketmq.common.message.Message;
import org.junit.jupiter.api.Test;

/**
 * DefaultMQProducer: sync, async, one-way and batch sends, a body the client
 * compresses, delay levels. What arrived is read back by the Rust side with a native
 * consumer (tests/tests/remoting.rs).
 */
class ProducerTest {
    static final int N = 10;

    static Message message(String topic, String tag, String key, String body) {
        Message m = new Message(topic, tag, key, body.getBytes(StandardCharsets.UTF_8));
        m.putUserProperty("face", "remoting");
        return m;
    }

    static DefaultMQProducer producer(String group) throws Exception {
        DefaultMQProducer p = new DefaultMQProducer(group);
        p.setNamesrvAddr(Broker.namesrv());
        p.setSendMsgTimeout(10_000);
        p.start();
        return p;
    }

    @Test
    void sendsEveryWay() throws Exception {
        String run = Broker.run();
        DefaultMQProducer p = producer("java-producer-" + run);
        try {
            for (int i = 0; i < N; i++) {
                SendResult r = p.send(message("java-sync-" + run, "TagA", "key-" + i, "sync-" + i));
                assertEquals(SendStatus.SEND_OK, r.getSendStatus());
                assertNotNull(r.getMsgId());
                assertEquals(32, r.getOffsetMsgId().length(), r.getOffsetMsgId());
                assertTrue(r.getMessageQueue().getQueueId() >= 0);
            }

            CountDownLatch done = new CountDownLatch(N);
            ConcurrentLinkedQueue<Throwable> failed = new ConcurrentLinkedQueue<>();
            for (int i = 0; i < N; i++) {
                p.send(message("java-async-" + run, "TagB", "key-" + i, "async-" + i), new SendCallback() {
                    @Override
                    public void onSuccess(SendResult r) {
                        if (r.getSendStatus() != SendStatus.SEND_OK) {
                            failed.add(new AssertionError("status " + r.getSendStatus()));
                        }
                        done.countDown();
                    }

                    @Override
                    public void onException(Throwable e) {
                        failed.add(e);
                        done.countDown();
                    }
                });
            }
            assertTrue(done.await(30, TimeUnit.SECONDS), "async sends answered");
            assertTrue(failed.isEmpty(), () -> "async failures: " + failed);

            for (int i = 0; i < N; i++) {
                p.sendOneway(message("java-oneway-" + run, "TagC", "key-" + i, "oneway-" + i));
            }

            List<Message> batch = new ArrayList<>();
            for (int i = 0; i < N; i++) {
                batch.add(message("java-batch-" + run, "TagD", "key-" + i, "batch-" + i));
            }
            SendResult b = p.send(batch);
            assertEquals(SendStatus.SEND_OK, b.getSendStatus());
            assertEquals(N, b.getMsgId().split(",").length, b.getMsgId());

            // Above compressMsgBodyOverHowmuch (4 KiB): the client zlib-compresses it.
            String big = "0123456789".repeat(1024);
            assertEquals(SendStatus.SEND_OK,
                    p.send(message("java-big-" + run, "TagE", "big", big)).getSendStatus());

            Message delayed = message("java-delay-" + run, "TagF", "delayed", "delay-2");
            delayed.setDelayTimeLevel(2);
            assertEquals(SendStatus.SEND_OK, p.send(delayed).getSendStatus());
        } finally {
            p.shutdown();
        }
    }
}
