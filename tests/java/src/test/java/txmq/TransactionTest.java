package txmq;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import org.apache.rocketmq.client.producer.LocalTransactionState;
import org.apache.rocketmq.client.producer.SendStatus;
import org.apache.rocketmq.client.producer.TransactionListener;
import org.apache.rocketmq.client.producer.TransactionMQProducer;
import org.apache.rocketmq.client.producer.TransactionSendResult;
import org.apache.rocketmq.common.message.Message;
import org.apache.rocketmq.common.message.MessageExt;
import org.junit.jupiter.api.Test;

/**
 * TransactionMQProducer: a commit, a rollback, and an UNKNOW left to the broker's
 * check-back, which this producer's listener answers with a commit. The Rust side then
 * reads the topic: the committed two, never the rolled-back one.
 */
class TransactionTest {
    @Test
    void commitRollbackAndCheckBack() throws Exception {
        String run = Broker.run();
        String topic = "java-txn-" + run;
        CountDownLatch checked = new CountDownLatch(1);
        TransactionMQProducer p = new TransactionMQProducer("java-txn-group-" + run);
        p.setNamesrvAddr(Broker.namesrv());
        p.setSendMsgTimeout(10_000);
        p.setTransactionListener(new TransactionListener() {
            @Override
            public LocalTransactionState executeLocalTransaction(Message msg, Object arg) {
                return switch ((String) arg) {
                    case "commit" -> LocalTransactionState.COMMIT_MESSAGE;
                    case "rollback" -> LocalTransactionState.ROLLBACK_MESSAGE;
                    default -> LocalTransactionState.UNKNOW;
                };
            }

            @Override
            public LocalTransactionState checkLocalTransaction(MessageExt msg) {
                String body = new String(msg.getBody(), StandardCharsets.UTF_8);
                if (!body.equals("txn-unknown")) {
                    return LocalTransactionState.UNKNOW;
                }
                checked.countDown();
                return LocalTransactionState.COMMIT_MESSAGE;
            }
        });
        p.start();
        try {
            for (String outcome : new String[] {"commit", "rollback", "unknown"}) {
                Message m = new Message(topic, "T", "key-" + outcome,
                        ("txn-" + outcome).getBytes(StandardCharsets.UTF_8));
                TransactionSendResult r = p.sendMessageInTransaction(m, outcome);
                assertEquals(SendStatus.SEND_OK, r.getSendStatus());
                assertEquals(32, r.getTransactionId().length(), r.getTransactionId());
            }
            assertTrue(checked.await(60, TimeUnit.SECONDS), "the broker checked back the unknown one");
            // The check's answer is one-way: give it a moment to land before leaving.
            Thread.sleep(500);
        } finally {
            p.shutdown();
        }
    }
}
