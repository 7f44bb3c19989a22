//! The bounds every face takes, broker-wide and made once per process (they outlive a
//! storage reopen and a change of leadership): the connection cap, counted over all
//! faces, and the byte budget of requests in flight.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// The budget counts KiB.
pub const BUDGET_UNIT: usize = 1024;

/// Broker-wide bounds.
#[derive(Debug)]
pub struct Limits {
    /// Bytes of requests in flight, in KiB units: a request takes its share before it
    /// is read further, and gives it back when answered.
    pub budget: Arc<Semaphore>,
    /// Units of the whole budget.
    units: u32,
    /// Open client connections, over every face.
    pub connections: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Limits {
    /// A budget of `max_in_flight_bytes` and a cap of `max_connections`.
    pub fn new(max_in_flight_bytes: usize, max_connections: usize, metrics: Arc<Metrics>) -> Self {
        let units = (max_in_flight_bytes / BUDGET_UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            budget: Arc::new(Semaphore::new(units)),
            units: u32::try_from(units).unwrap_or(u32::MAX),
            connections: Arc::new(Semaphore::new(max_connections)),
            metrics,
        }
    }

    /// Units of the budget `bytes` take: at least one, at most the whole budget (a
    /// request larger than all of it waits for all of it, never for ever).
    pub fn units_for(&self, bytes: u64) -> u32 {
        let units = bytes.div_ceil(BUDGET_UNIT as u64).max(1);
        u32::try_from(units).unwrap_or(u32::MAX).min(self.units)
    }

    /// A connection was refused at the cap.
    pub fn refused(&self) {
        self.metrics.connections_refused.inc();
    }
}
