//! The txmq client.
//!
//! # Layout
//! - [`connection`]: one multiplexed connection: requests by correlation id, plus the
//!   broker's pushes (deliveries, check-backs).
//! - [`producer`]: [`Producer`] for plain sends and transactions, with a
//!   [`TransactionChecker`] that answers the broker's check-backs.
//! - [`consumer`]: [`Consumer`], a `Stream` of [`Delivery`] with ack, nack and extend.
//! - [`admin`]: [`Admin`] views and operator control.
//! - [`batch`]: concurrent sends (and acks) coalesced into one request.
//!
//! `examples/quickstart.rs` is the runnable version of what follows
//! (`cargo run -p txmq-client --example quickstart` with a broker running).
//!
//! ```no_run
//! # async fn demo() -> Result<(), txmq_client::Error> {
//! use futures::StreamExt;
//! use txmq_client::{Consumer, ConsumerOptions, Message, Producer, ProducerOptions};
//!
//! let producer = Producer::connect("127.0.0.1:9876", ProducerOptions::default()).await?;
//! let receipt = producer.send(Message::new("orders", "order 42")).await?;
//! println!("stored at offset {}", receipt.offset);
//!
//! let mut consumer =
//!     Consumer::subscribe("127.0.0.1:9876", ConsumerOptions::new("points", "orders")).await?;
//! if let Some(delivery) = consumer.next().await {
//!     let delivery = delivery?;
//!     println!("{:?}", delivery.body());
//!     delivery.ack().await?;
//! }
//!
//! // A transaction: the message is stored but invisible until commit. The checker
//! // answers the broker's check-back if this process dies before it commits.
//! use txmq_client::{CheckRequest, Outcome};
//! let checker = |_req: CheckRequest| async { Outcome::Commit };
//! let orders =
//!     Producer::connect("127.0.0.1:9876", ProducerOptions::transactional("orders", checker))
//!         .await?;
//! let mut txn = orders.begin()?;
//! txn.send(Message::new("orders", "order 43")).await?;
//! // ... commit the local database transaction here ...
//! txn.commit().await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod access;
pub mod admin;
pub mod batch;
pub mod connection;
pub mod consumer;
pub mod error;
pub mod producer;
pub mod tls;

pub use access::RuleSpec;
pub use admin::{Admin, ResetTo, TopicChange};
pub use connection::User;
pub use consumer::{Consumer, ConsumerOptions, Delivery, StartFrom};
pub use error::{Error, Result};
pub use producer::{
    CheckRequest, Limits, Message, Outcome, Producer, ProducerOptions, Receipt, Transaction,
    TransactionChecker,
};
pub use tls::Tls;
pub use txmq_protocol::{CHECK_SCOPE_PROPERTY, ErrorCode, pb};
