//! The client in one page: a plain send, a transaction whose outcome a check-back could
//! also settle, and a consumer that acks. Run it against a broker:
//!
//! ```sh
//! bash scripts/broker.sh                                  # in one shell
//! cargo run -p txmq-client --example quickstart           # in another
//! ```
//!
//! An address argument overrides `127.0.0.1:9876`.

use std::time::Duration;

use futures::StreamExt;
use txmq_client::{
    CheckRequest, Consumer, ConsumerOptions, Message, Outcome, Producer, ProducerOptions,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9876".into());
    let topic = format!("quickstart-{}", std::process::id());

    // A plain durable send: the receipt means the message is on disk.
    let producer = Producer::connect(&addr, ProducerOptions::default()).await?;
    let receipt = producer.send(Message::new(&topic, "hello")).await?;
    println!("sent hello at offset {}", receipt.offset);

    // A transactional send. The checker answers the broker's check-back if this process
    // dies before commit: a real service looks the order up in its own database.
    let checker = |req: CheckRequest| async move {
        println!("check-back for {}", req.txn_id);
        Outcome::Commit
    };
    let orders =
        Producer::connect(&addr, ProducerOptions::transactional("quickstart", checker)).await?;
    let mut txn = orders.begin()?;
    txn.send(Message::new(&topic, "order 42").key("42")).await?; // stored, invisible
    // ... the local database transaction runs here ...
    txn.commit().await?; // now visible, atomically
    println!("committed transaction {}", txn.id().unwrap_or_default());

    // A consumer group receives both, and acks each.
    let mut consumer =
        Consumer::subscribe(&addr, ConsumerOptions::new("quickstart", &topic)).await?;
    for _ in 0..2 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await?
            .ok_or("subscription ended")??;
        println!(
            "received {:?} (attempt {})",
            String::from_utf8_lossy(delivery.body()),
            delivery.attempt
        );
        delivery.ack().await?;
    }
    Ok(())
}
