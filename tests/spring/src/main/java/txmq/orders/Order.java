package txmq.orders;

/**
 * An order as the message carries it: {@code id,customer,amount}. A customer named
 * {@code crash} makes the service stop between its database commit and telling the broker
 * (the broker's check-back must commit it); {@code lost} stops before the database commit
 * (the check-back must roll it back). An amount of 0 or less is refused by the database
 * transaction (rolled back at once).
 */
public record Order(String id, String customer, int amount) {
    public String body() {
        return id + "," + customer + "," + amount;
    }

    public static Order parse(String body) {
        String[] f = body.split(",", 3);
        if (f.length != 3) {
            throw new IllegalArgumentException("not an order: " + body);
        }
        return new Order(f[0], f[1], Integer.parseInt(f[2]));
    }
}
