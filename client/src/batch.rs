//! Coalescing: concurrent calls of one kind (plain sends of a producer, acks of a
//! consumer's connection) become one request, so they share one frame, one dispatch on the
//! broker and one storage write.
//!
//! A caller never waits for a batch to fill. A few batches may be in flight at once; the
//! next batch is taken only when one of those slots is free, and takes everything that
//! queued meanwhile, up to [`MAX_BATCH`] items and [`MAX_BATCH_BYTES`] (so a batch of
//! large messages still fits in one frame). A lone caller therefore goes out at once, and
//! under load batches grow with the round-trip time — the same idea as the broker's group
//! commit, one hop earlier.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::{Error, Result};

/// Most items in one request.
pub const MAX_BATCH: usize = 512;

/// Most bytes (as the caller weighs its items) in one request; an item heavier than this
/// goes alone. Well under the smallest frame limit a broker accepts for one message's worth.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

type Item<T, R> = (T, oneshot::Sender<Result<R>>);

/// A queue in front of one kind of call; cheap to clone.
pub struct Batcher<T, R> {
    tx: mpsc::Sender<Item<T, R>>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<T, R> std::fmt::Debug for Batcher<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the task that calls `flush` with each batch, with up to `parallel` calls in
    /// flight; `flush` returns one result per item, in order. `weigh` tells an item's size
    /// on the wire. The task ends when the last clone of the batcher is dropped.
    pub fn spawn<W, F, Fut>(parallel: usize, weigh: W, flush: F) -> Self
    where
        W: Fn(&T) -> usize + Send + 'static,
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Result<R>>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Item<T, R>>(MAX_BATCH * parallel);
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(parallel));
            // An item taken that did not fit in the last batch: it opens the next one.
            let mut carried: Option<Item<T, R>> = None;
            loop {
                let first = match carried.take() {
                    Some(item) => item,
                    None => match rx.recv().await {
                        Some(item) => item,
                        None => return,
                    },
                };
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let mut bytes = weigh(&first.0);
                let mut items = vec![first];
                while items.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(item) => {
                            bytes += weigh(&item.0);
                            if bytes > MAX_BATCH_BYTES {
                                carried = Some(item);
                                break;
                            }
                            items.push(item);
                        }
                        Err(_) => break,
                    }
                }
                let (values, waiters): (Vec<T>, Vec<_>) = items.into_iter().unzip();
                let n = waiters.len();
                let call = flush(values);
                tokio::spawn(async move {
                    let results = call.await;
                    debug_assert_eq!(results.len(), n, "one result per item");
                    let mut results = results.into_iter();
                    for w in waiters {
                        let r = results
                            .next()
                            .unwrap_or_else(|| Err(Error::Unexpected("no result".into())));
                        let _ = w.send(r);
                    }
                    drop(slot);
                });
            }
        });
        Self { tx }
    }

    /// Queues `value` and waits for its own result.
    ///
    /// # Errors
    /// What the batch's call gave this item.
    pub async fn submit(&self, value: T) -> Result<R> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((value, tx))
            .await
            .map_err(|_| Error::Disconnected("the batching task stopped".into()))?;
        rx.await
            .map_err(|_| Error::Disconnected("the batching task stopped".into()))?
    }
}

/// The same error for every item of a failed batch.
pub fn copy_error(e: &Error) -> Error {
    match e {
        Error::Broker { code, message } => Error::Broker {
            code: *code,
            message: message.clone(),
        },
        Error::Disconnected(m) => Error::Disconnected(m.clone()),
        Error::Invalid(m) => Error::Invalid(m.clone()),
        Error::Unexpected(m) => Error::Unexpected(m.clone()),
        Error::Timeout(d) => Error::Timeout(*d),
        other => Error::Disconnected(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_calls_share_batches_and_each_gets_its_result() {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let b: Batcher<u32, u32> = Batcher::spawn(
            4,
            |_| 4,
            move |items: Vec<u32>| {
                seen.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    items
                        .into_iter()
                        .map(|i| {
                            if i == 7 {
                                Err(Error::Invalid("seven".into()))
                            } else {
                                Ok(i * 2)
                            }
                        })
                        .collect()
                }
            },
        );
        let results = futures::future::join_all((0..1000u32).map(|i| {
            let b = b.clone();
            async move { b.submit(i).await }
        }))
        .await;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(v) => assert_eq!(v, 2 * i as u32),
                Err(e) => assert_eq!((i, e.to_string()), (7, "seven".to_string())),
            }
        }
        let calls = calls.load(Ordering::SeqCst);
        assert!(calls < 100, "1000 concurrent calls made {calls} requests");
        // A lone call goes out on its own, without waiting for company.
        assert_eq!(b.submit(1).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_batch_stays_within_its_byte_budget() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let b: Batcher<usize, ()> = Batcher::spawn(
            4,
            |bytes: &usize| *bytes,
            move |items: Vec<usize>| {
                seen.lock().unwrap().push(items.iter().sum::<usize>());
                async move {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    items.into_iter().map(|_| Ok(())).collect()
                }
            },
        );
        // 40 items of 1 MiB and one heavier than the whole budget, all at once.
        let items = std::iter::repeat_n(1 << 20, 40).chain([MAX_BATCH_BYTES * 2]);
        let results = futures::future::join_all(items.map(|bytes| {
            let b = b.clone();
            async move { b.submit(bytes).await }
        }))
        .await;
        assert!(results.iter().all(Result::is_ok));
        let sizes = sizes.lock().unwrap();
        assert_eq!(
            sizes.iter().sum::<usize>(),
            (40 << 20) + MAX_BATCH_BYTES * 2
        );
        for &size in sizes.iter() {
            assert!(
                size <= MAX_BATCH_BYTES || size == MAX_BATCH_BYTES * 2,
                "a batch of {size} bytes"
            );
        }
        assert!(sizes.len() < 20, "{} batches for 41 items", sizes.len());
    }
}
