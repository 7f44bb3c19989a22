package txmq.orders;

import java.util.concurrent.atomic.AtomicInteger;

import org.apache.rocketmq.spring.annotation.RocketMQMessageListener;
import org.apache.rocketmq.spring.core.RocketMQListener;
import org.springframework.jdbc.core.JdbcTemplate;
import org.springframework.stereotype.Component;

/** The points service: one point per unit of an order's amount, once per order. */
@Component
@RocketMQMessageListener(topic = "${txmq.orders.topic}", consumerGroup = "${txmq.points.group}")
public class PointsListener implements RocketMQListener<String> {
    private final JdbcTemplate db;
    /** Deliveries, redeliveries included (the test reads it). */
    public final AtomicInteger deliveries = new AtomicInteger();

    public PointsListener(JdbcTemplate db) {
        this.db = db;
    }

    @Override
    public void onMessage(String body) {
        deliveries.incrementAndGet();
        Order order = Order.parse(body);
        // At least once: a redelivered order must not count twice.
        db.update("MERGE INTO points (order_id, customer, points) KEY (order_id) VALUES (?, ?, ?)",
            order.id(), order.customer(), order.amount());
    }
}
