package txmq.orders;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.TreeSet;

import org.apache.rocketmq.client.producer.LocalTransactionState;
import org.apache.rocketmq.client.producer.SendStatus;
import org.junit.jupiter.api.Test;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.boot.test.context.SpringBootTest;
import org.springframework.jdbc.core.JdbcTemplate;

/**
 * The order → points flow of an unmodified Spring Boot service against txmq: every order
 * whose database transaction committed earns its points exactly once, including those whose
 * service stopped before telling the broker (resolved by check-back); no refused or lost
 * order earns any.
 */
@SpringBootTest
class OrderPointsTest {
    @Autowired OrderService orders;
    @Autowired OrderTransactionListener transactions;
    @Autowired PointsListener points;
    @Autowired JdbcTemplate db;

    @Test
    void committedOrdersEarnPointsOnceAndNothingElseDoes() throws Exception {
        List<Order> placed = new ArrayList<>();
        for (int i = 0; i < 10; i++) {
            placed.add(new Order("order-" + i, "customer-" + (i % 3), 10 + i));
        }
        placed.add(new Order("order-refused-1", "customer-0", 0));
        placed.add(new Order("order-refused-2", "customer-1", -5));
        placed.add(new Order("order-crash-1", "crash", 7));
        placed.add(new Order("order-crash-2", "crash", 8));
        placed.add(new Order("order-lost", "lost", 9));

        TreeMap<String, Integer> earned = new TreeMap<>();
        for (Order o : placed) {
            var result = orders.place(o);
            assertEquals(SendStatus.SEND_OK, result.getSendStatus(), o.id());
            LocalTransactionState expect;
            if (o.amount() <= 0) {
                expect = LocalTransactionState.ROLLBACK_MESSAGE;
            } else if (o.customer().equals("crash") || o.customer().equals("lost")) {
                expect = LocalTransactionState.UNKNOW;
            } else {
                expect = LocalTransactionState.COMMIT_MESSAGE;
            }
            assertEquals(expect, result.getLocalTransactionState(), o.id());
            if (o.amount() > 0 && !o.customer().equals("lost")) {
                earned.put(o.id(), o.amount());
            }
        }
        assertEquals(12, earned.size());

        // The points service catches up: the ten committed at once, and the two the broker's
        // check-back committed. The lost order's check-back rolls it back.
        long deadline = System.currentTimeMillis() + 90_000;
        while (System.currentTimeMillis() < deadline
            && (count("points") < earned.size() || transactions.checks.get() < 3)) {
            Thread.sleep(200);
        }
        assertTrue(transactions.checks.get() >= 3,
            "the broker checked back the three unresolved orders: " + transactions.checks.get());
        // Whatever the lost order's fate, it would have arrived by now with the others.
        Thread.sleep(2_000);

        TreeMap<String, Integer> got = new TreeMap<>();
        for (Map<String, Object> row : db.queryForList("SELECT order_id, points FROM points")) {
            got.put((String) row.get("ORDER_ID"), ((Number) row.get("POINTS")).intValue());
        }
        assertEquals(earned, got, "points earned, order by order");
        assertEquals(new TreeSet<>(earned.keySet()),
            new TreeSet<>(db.queryForList("SELECT id FROM orders", String.class)),
            "the orders table holds exactly the committed orders");
        assertTrue(points.deliveries.get() >= earned.size(), "deliveries " + points.deliveries.get());
        System.out.println("txmq-spring: " + got.size() + " orders earned points; "
            + transactions.checks.get() + " check-backs; " + points.deliveries.get() + " deliveries");
    }

    private int count(String table) {
        Integer n = db.queryForObject("SELECT COUNT(*) FROM " + table, Integer.class);
        return n == null ? 0 : n;
    }
}
