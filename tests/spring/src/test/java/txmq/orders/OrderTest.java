package txmq.orders;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import org.junit.jupiter.api.Test;

/** The message body's shape; needs no broker (scripts/setup.sh runs it to resolve the test runner). */
class OrderTest {
    @Test
    void aBodyReadsBackAsItsOrder() {
        Order o = new Order("order-1", "customer-2", 17);
        assertEquals(o, Order.parse(o.body()));
        assertThrows(IllegalArgumentException.class, () -> Order.parse("order-1,customer"));
        assertThrows(NumberFormatException.class, () -> Order.parse("order-1,c,many"));
    }
}
