package txmq.orders;

import org.apache.rocketmq.client.producer.TransactionSendResult;
import org.apache.rocketmq.spring.core.RocketMQTemplate;
import org.apache.rocketmq.spring.support.RocketMQHeaders;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.messaging.support.MessageBuilder;
import org.springframework.stereotype.Service;

/** Places an order: the order row and the message about it, in one transaction. */
@Service
public class OrderService {
    private final RocketMQTemplate template;
    private final String topic;

    public OrderService(RocketMQTemplate template, @Value("${txmq.orders.topic}") String topic) {
        this.template = template;
        this.topic = topic;
    }

    /** The half message is sent, then {@link OrderTransactionListener} runs the local transaction. */
    public TransactionSendResult place(Order order) {
        var message = MessageBuilder.withPayload(order.body())
            .setHeader(RocketMQHeaders.KEYS, order.id())
            .build();
        return template.sendMessageInTransaction(topic, message, order);
    }
}
