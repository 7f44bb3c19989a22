package txmq;

/** Where the broker under test is, as the Rust test that runs Maven says. */
final class Broker {
    private Broker() {}

    /** The Remoting face's HOST:PORT: the clients' namesrvAddr. */
    static String namesrv() {
        String at = System.getProperty("txmq.namesrv");
        if (at == null || at.isEmpty() || at.startsWith("$")) {
            throw new IllegalStateException("run with -Dtxmq.namesrv=HOST:PORT (tests/tests/remoting.rs does)");
        }
        return at;
    }

    /** A suffix that keeps this run's topics and groups apart from another's. */
    static String run() {
        return System.getProperty("txmq.run", "r");
    }
}
