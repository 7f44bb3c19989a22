package txmq;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.nio.charset.StandardCharsets;
import java.util.Set;
import java.util.TreeSet;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.TimeUnit;
import org.apache.rocketmq.client.consumer.DefaultMQPushConsumer;
import org.apache.rocketmq.client.consumer.listener.ConsumeConcurrentlyStatus;
import org.apache.rocketmq.client.consumer.listener.MessageListenerConcurrently;
import org.apache.rocketmq.client.producer.DefaultMQProducer;
import org.apache.rocketmq.client.producer.SendStatus;
import org.apache.rocketmq.common.consumer.ConsumeFromWhere;
import org.apache.rocketmq.common.message.Message;
import org.apache.rocketmq.common.message.MessageExt;
import org.junit.jupiter.api.Test;

/**
 * `setUseTLS(true)`: a producer and a push consumer over TLS to a broker whose Remoting
 * port speaks TLS only (its name-server requests too). The client's default test mode
 * trusts the broker's self-signed certificate, as RocketMQ's does.
 */
class TlsTest {
    @Test
    void aProducerAndAConsumerOverTls() throws Exception {
        String run = Broker.run();
        String topic = "java-tls-" + run;
        DefaultMQProducer p = new DefaultMQProducer("java-tls-producer-" + run);
        p.setNamesrvAddr(Broker.namesrv());
        p.setUseTLS(true);
        p.setSendMsgTimeout(10_000);
        p.start();
        try {
            for (int i = 0; i < 3; i++) {
                Message m = new Message(topic, "T", ("tls-" + i).getBytes(StandardCharsets.UTF_8));
                assertEquals(SendStatus.SEND_OK, p.send(m).getSendStatus());
            }
        } finally {
            p.shutdown();
        }
        Set<String> seen = ConcurrentHashMap.newKeySet();
        DefaultMQPushConsumer c = new DefaultMQPushConsumer("java-tls-group-" + run);
        c.setNamesrvAddr(Broker.namesrv());
        c.setUseTLS(true);
        c.setInstanceName("tls");
        c.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET);
        c.subscribe(topic, "*");
        c.registerMessageListener((MessageListenerConcurrently) (msgs, ctx) -> {
            for (MessageExt m : msgs) {
                seen.add(new String(m.getBody(), StandardCharsets.UTF_8));
            }
            return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
        });
        c.start();
        try {
            long deadline = System.currentTimeMillis() + 60_000;
            while (seen.size() < 3 && System.currentTimeMillis() < deadline) {
                TimeUnit.MILLISECONDS.sleep(100);
            }
            assertEquals(new TreeSet<>(Set.of("tls-0", "tls-1", "tls-2")), new TreeSet<>(seen));
        } finally {
            c.shutdown();
        }
    }
}
