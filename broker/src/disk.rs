//! Disk watermarks: above the high-water mark of disk use, new messages are refused
//! with `DISK_FULL` (sends and prepares; commits, rollbacks and acks of what is stored
//! still work, so producers and consumers can drain); below the low-water mark they are
//! taken again. Checked twice a second from the file system's own figures (statvfs).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::storage::StorageHandle;

/// How often disk use is looked at.
const EVERY: Duration = Duration::from_millis(500);

/// The fraction of the file system holding `path` that is in use (0–1), as `df` counts
/// it: used over used plus available (blocks reserved for root are neither).
pub fn used(path: &Path) -> std::io::Result<f64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe_zeroed();
    #[allow(unsafe_code)]
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // As `df` counts it: of the space this broker's files may take (what is used plus
    // what is available to users), how much is used. Blocks reserved for root are
    // neither, so a file system with a large reserve does not look full while half of
    // it is free (1 - available/total did, on a machine with 160 GiB reserved).
    Ok(ratio(st.f_blocks, st.f_bfree, st.f_bavail))
}

/// Used over used plus available, from statvfs's block counts.
fn ratio(blocks: u64, free: u64, available: u64) -> f64 {
    if blocks > 0 && available == 0 {
        // Nothing left to write to, whatever the counts say.
        return 1.0;
    }
    let used = blocks.saturating_sub(free) as f64;
    let usable = used + available as f64;
    if usable == 0.0 {
        return 0.0;
    }
    used / usable
}

fn unsafe_zeroed() -> libc::statvfs {
    #[allow(unsafe_code)]
    // SAFETY: statvfs is a plain C struct of integers, for which all zeroes is valid.
    unsafe {
        std::mem::zeroed()
    }
}

/// Watches disk use until cancelled, switching the storage's `disk_full` with
/// hysteresis.
pub async fn watch(
    storage: StorageHandle,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    if config.disk_high_watermark >= 1.0 {
        // Off: a disk that fills gives STORAGE_ERROR from the write itself.
        return;
    }
    let path = storage.path().to_path_buf();
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let path = path.clone();
        let Ok(Ok(use_now)) = tokio::task::spawn_blocking(move || used(&path)).await else {
            continue;
        };
        metrics.disk_used_ratio.set(use_now);
        let full = storage.disk_full();
        if !full && use_now >= config.disk_high_watermark {
            tracing::warn!(
                used = format!("{:.1} %", use_now * 100.0),
                "disk above its high-water mark: new messages are refused (DISK_FULL)"
            );
            storage.set_disk_full(true);
        } else if full && use_now <= config.disk_low_watermark {
            tracing::info!(
                used = format!("{:.1} %", use_now * 100.0),
                "disk below its low-water mark: new messages are taken again"
            );
            storage.set_disk_full(false);
        }
        metrics.disk_full.set(i64::from(storage.disk_full()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machine this was found on: 252 GiB, 66 GiB used, 26 GiB available to users,
    /// 160 GiB reserved. `df` says 73 %; 1 - available/total said 90 % and refused sends.
    #[test]
    fn a_large_root_reserve_is_not_use() {
        let r = ratio(66_053_021, 48_829_924, 6_598_375);
        assert!((0.72..0.73).contains(&r), "{r}");
        assert_eq!(ratio(100, 100, 100), 0.0);
        assert_eq!(ratio(100, 0, 0), 1.0);
        assert_eq!(ratio(100, 100, 0), 1.0, "all reserved: nothing available");
        assert_eq!(ratio(0, 0, 0), 0.0);
    }
}
