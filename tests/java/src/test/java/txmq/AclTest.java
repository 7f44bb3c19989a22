package txmq;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import org.apache.rocketmq.acl.common.AclClientRPCHook;
import org.apache.rocketmq.acl.common.SessionCredentials;
import org.apache.rocketmq.client.consumer.DefaultMQPushConsumer;
import org.apache.rocketmq.client.consumer.listener.ConsumeConcurrentlyStatus;
import org.apache.rocketmq.client.consumer.listener.MessageListenerConcurrently;
import org.apache.rocketmq.client.producer.DefaultMQProducer;
import org.apache.rocketmq.client.producer.SendStatus;
import org.apache.rocketmq.common.consumer.ConsumeFromWhere;
import org.apache.rocketmq.common.message.Message;
import org.junit.jupiter.api.Test;

/**
 * AclClientRPCHook against a broker with users: the user's name and secret sign every
 * request; its rules decide. Run by tests/tests/remoting.rs with -Dtxmq.ak, -Dtxmq.sk
 * (a user allowed pub and sub on acl-ok and sub on group acl-group, nothing else).
 */
class AclTest {
    static AclClientRPCHook hook(String secret) {
        return new AclClientRPCHook(new SessionCredentials(System.getProperty("txmq.ak"), secret));
    }

    static DefaultMQProducer producer(String secret) throws Exception {
        DefaultMQProducer p = new DefaultMQProducer("acl-producer", hook(secret));
        p.setNamesrvAddr(Broker.namesrv());
        p.setSendMsgTimeout(5_000);
        p.setRetryTimesWhenSendFailed(0);
        p.start();
        return p;
    }

    static Message message(String topic, String body) {
        return new Message(topic, "T", body.getBytes(StandardCharsets.UTF_8));
    }

    @Test
    void aSignedClientProducesAndConsumesWhatItsRulesAllow() throws Exception {
        DefaultMQProducer p = producer(System.getProperty("txmq.sk"));
        try {
            assertEquals(SendStatus.SEND_OK, p.send(message("acl-ok", "signed")).getSendStatus());
            // Another topic: no rule allows it.
            assertThrows(Exception.class, () -> p.send(message("acl-other", "refused")));
        } finally {
            p.shutdown();
        }
        CountDownLatch got = new CountDownLatch(1);
        DefaultMQPushConsumer c = new DefaultMQPushConsumer("acl-group", hook(System.getProperty("txmq.sk")),
                new org.apache.rocketmq.client.consumer.rebalance.AllocateMessageQueueAveragely());
        c.setNamesrvAddr(Broker.namesrv());
        c.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET);
        c.subscribe("acl-ok", "*");
        c.registerMessageListener((MessageListenerConcurrently) (msgs, ctx) -> {
            msgs.forEach(m -> got.countDown());
            return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
        });
        c.start();
        try {
            assertTrue(got.await(60, TimeUnit.SECONDS), "the signed consumer received");
        } finally {
            c.shutdown();
        }
    }

    @Test
    void aWrongSecretIsRefused() throws Exception {
        DefaultMQProducer p = producer("not-the-secret");
        try {
            assertThrows(Exception.class, () -> p.send(message("acl-ok", "forged")));
        } finally {
            p.shutdown();
        }
    }
}
