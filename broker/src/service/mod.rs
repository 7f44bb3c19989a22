//! The one door: every operation of the broker, whatever face it came through.
//!
//! Each operation is one function that takes the [`Shared`] broker, the asking
//! [`Principal`] and a request, checks the request once, here at the boundary, and
//! returns an [`Answer`]: a future that resolves once the work is durable. The faces
//! (`crate::faces`) translate their wire into these calls and the outcomes back; they
//! touch neither storage, nor the writer, nor the consumer groups' queues.

pub mod access;
pub mod admin;
pub mod cluster;
pub mod consume;
pub mod delete;
pub mod limits;
pub mod messages;
pub mod principal;
pub mod scheduled;
pub mod send;
mod shared;
pub mod txn;
pub mod users;
pub mod validate;

use std::future::Future;
use std::pin::Pin;

use crate::error::{Error, Result};
use crate::ids::Id;

pub use principal::{Face, Principal};
pub use shared::Shared;

/// An operation's outcome on its way.
pub type Answer<T> = Pin<Box<dyn Future<Output = Result<T>> + Send>>;

/// An outcome known now.
pub fn now<T: Send + 'static>(result: Result<T>) -> Answer<T> {
    Box::pin(std::future::ready(result))
}

/// An outcome that comes when `work` finishes.
pub fn later<T>(work: impl Future<Output = Result<T>> + Send + 'static) -> Answer<T> {
    Box::pin(work)
}

/// Runs a storage read off the async workers.
///
/// # Errors
/// The read's error, or an internal one when its task panicked.
pub async fn blocking<T: Send + 'static>(
    storage: &crate::storage::StorageHandle,
    read: impl FnOnce(&crate::storage::Storage) -> Result<T> + Send + 'static,
) -> Result<T> {
    let storage = storage.clone();
    tokio::task::spawn_blocking(move || read(&storage))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
}

/// Most entries in one page of any listing.
pub const MAX_PAGE: usize = 1000;

/// A listing's page size: `limit`, or [`MAX_PAGE`] when 0 or more.
pub fn page(limit: u32) -> usize {
    match limit as usize {
        0 => MAX_PAGE,
        n => n.min(MAX_PAGE),
    }
}

/// Checks a topic or group name.
///
/// # Errors
/// [`Error::InvalidName`] saying what is wrong.
pub fn name(kind: &str, name: &str) -> Result<()> {
    txmq_protocol::names::validate(kind, name).map_err(Error::InvalidName)
}

/// Parses a transaction id.
///
/// # Errors
/// [`Error::Invalid`] when it is not 32 hex digits.
pub fn txn_id(text: &str) -> Result<Id> {
    Id::parse(text).ok_or_else(|| {
        Error::Invalid(format!(
            "{text:?} is not a transaction id (32 hexadecimal digits)"
        ))
    })
}
