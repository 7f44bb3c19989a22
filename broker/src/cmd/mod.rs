//! Requests, one module per family. Each validates its request once, here at the
//! boundary, and returns a [`Pending`] answer: a future that resolves to the response
//! frame once the work is durable.

pub mod admin;
pub mod consume;
pub mod hello;
pub mod send;
pub mod txn;
pub mod validate;

use std::future::Future;
use std::pin::Pin;

use txmq_protocol::{Frame, pb};

use crate::connection::response;
use crate::error::{Error, Result};
use crate::ids::Id;

/// A response on its way.
pub type Pending = Pin<Box<dyn Future<Output = Frame> + Send>>;

/// A response that is known now.
pub fn ready(id: u64, result: Result<pb::response::Result>) -> Pending {
    Box::pin(std::future::ready(response(id, result)))
}

/// A response that comes when `work` finishes.
pub fn later(
    id: u64,
    work: impl Future<Output = Result<pb::response::Result>> + Send + 'static,
) -> Pending {
    Box::pin(async move { response(id, work.await) })
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
