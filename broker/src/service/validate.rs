//! Range checks for the numbers a client sends: every duration from the network is
//! checked here, at the boundary, before anything adds it to a clock (unchecked, a
//! `u64::MAX` lease wrapped around and burned a message's attempts into the DLQ).

use std::time::Duration;

use crate::error::{Error, Result};

/// Longest lease (invisible duration) a consumer may ask for, at subscribe or extend.
pub const MAX_LEASE: Duration = Duration::from_secs(12 * 3600);
/// Longest delay a nack may ask for.
pub const MAX_NACK_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest first-check delay a transaction may ask for.
pub const MAX_CHECK_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// `ms` as a duration within `min..=max`.
///
/// # Errors
/// [`Error::Invalid`] naming the field and the allowed range.
pub fn duration_ms(field: &str, ms: u64, min: Duration, max: Duration) -> Result<Duration> {
    let d = Duration::from_millis(ms);
    if d < min || d > max {
        return Err(Error::Invalid(format!(
            "{field} is {ms} ms; the allowed range is {} to {} ms",
            min.as_millis(),
            max.as_millis()
        )));
    }
    Ok(d)
}

/// A lease: 1 ms to [`MAX_LEASE`].
///
/// # Errors
/// Out of range.
pub fn lease_ms(field: &str, ms: u64) -> Result<Duration> {
    duration_ms(field, ms, Duration::from_millis(1), MAX_LEASE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_names_the_field_and_the_range() {
        assert_eq!(lease_ms("lease_ms", 5).unwrap(), Duration::from_millis(5));
        let e = lease_ms("lease_ms", u64::MAX).unwrap_err().to_string();
        assert!(e.contains("lease_ms") && e.contains("43200000"), "{e}");
        assert!(lease_ms("lease_ms", 0).is_err());
        assert!(duration_ms("delay_ms", 0, Duration::ZERO, MAX_NACK_DELAY).is_ok());
    }
}
