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
use crate::storage::Storage;

/// How often disk use is looked at.
const EVERY: Duration = Duration::from_millis(500);

/// The fraction of the file system holding `path` that is in use (0–1), as `df` counts
/// it (blocks reserved for root count as used).
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
    let total = st.f_blocks as f64;
    if total == 0.0 {
        return Ok(0.0);
    }
    Ok(1.0 - st.f_bavail as f64 / total)
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
    storage: Arc<Storage>,
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
