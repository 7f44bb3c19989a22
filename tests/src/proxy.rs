//! A TCP proxy in front of a broker that can lose one answer: armed, it closes the
//! connection the moment the broker's next bytes arrive, without passing them on. The
//! request was written and stored, and the client never hears so: the connection cut
//! between the write and the reply that idempotent sends must survive.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy; stopped when dropped.
pub struct CutProxy {
    addr: String,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let (armed, cuts) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let target = target.to_string();
        let task = {
            let (armed, cuts) = (armed.clone(), cuts.clone());
            tokio::spawn(async move {
                let mut conns = tokio::task::JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(broker) = TcpStream::connect(&target).await else {
                        continue;
                    };
                    conns.spawn(forward(client, broker, armed.clone(), cuts.clone()));
                }
            })
        };
        Self {
            addr,
            armed,
            cuts,
            task,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Loses the next answer the broker sends on any connection (and that connection).
    pub fn cut_next_reply(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Answers lost so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    client: TcpStream,
    broker: TcpStream,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicU64>,
) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut broker_rx, mut broker_tx) = broker.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut client_rx, &mut broker_tx).await;
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match broker_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if armed.swap(false, Ordering::SeqCst) {
                cuts.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if client_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Whichever side ends first closes both (dropping the halves).
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}
