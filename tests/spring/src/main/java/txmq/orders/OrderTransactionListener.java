package txmq.orders;

import java.nio.charset.StandardCharsets;
import java.util.concurrent.atomic.AtomicInteger;

import org.apache.rocketmq.spring.annotation.RocketMQTransactionListener;
import org.apache.rocketmq.spring.core.RocketMQLocalTransactionListener;
import org.apache.rocketmq.spring.core.RocketMQLocalTransactionState;
import org.springframework.jdbc.core.JdbcTemplate;
import org.springframework.messaging.Message;
import org.springframework.transaction.support.TransactionTemplate;

/** The order service's local transaction, and its answer when the broker checks back. */
@RocketMQTransactionListener
public class OrderTransactionListener implements RocketMQLocalTransactionListener {
    private final JdbcTemplate db;
    private final TransactionTemplate tx;
    /** How many check-backs this service answered (the test reads it). */
    public final AtomicInteger checks = new AtomicInteger();

    public OrderTransactionListener(JdbcTemplate db, TransactionTemplate tx) {
        this.db = db;
        this.tx = tx;
    }

    @Override
    public RocketMQLocalTransactionState executeLocalTransaction(Message msg, Object arg) {
        Order order = (Order) arg;
        if (order.customer().equals("lost")) {
            // Gone before its database transaction: nothing was written.
            return RocketMQLocalTransactionState.UNKNOWN;
        }
        try {
            tx.executeWithoutResult(status -> {
                db.update("INSERT INTO orders (id, customer, amount) VALUES (?, ?, ?)",
                    order.id(), order.customer(), order.amount());
                if (order.amount() <= 0) {
                    throw new IllegalArgumentException("an order's amount must be positive");
                }
            });
        } catch (RuntimeException refused) {
            return RocketMQLocalTransactionState.ROLLBACK;
        }
        if (order.customer().equals("crash")) {
            // Committed locally, then gone before telling the broker.
            return RocketMQLocalTransactionState.UNKNOWN;
        }
        return RocketMQLocalTransactionState.COMMIT;
    }

    @Override
    public RocketMQLocalTransactionState checkLocalTransaction(Message msg) {
        checks.incrementAndGet();
        Object payload = msg.getPayload();
        String body = payload instanceof byte[] b ? new String(b, StandardCharsets.UTF_8) : payload.toString();
        Order order = Order.parse(body);
        Integer rows = db.queryForObject("SELECT COUNT(*) FROM orders WHERE id = ?", Integer.class, order.id());
        return rows != null && rows > 0
            ? RocketMQLocalTransactionState.COMMIT
            : RocketMQLocalTransactionState.ROLLBACK;
    }
}
